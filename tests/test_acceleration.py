"""Channels-last and torch.compile options: same outputs and keys as the plain path."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from conftest import ROOT, load_config

import main
from ldm.modules import acceleration
from ldm.util import instantiate_from_config


def tiny_model(unet: dict | None = None, **params):
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(params)
    config.params.unet_config.params.update(unet or {})
    torch.manual_seed(0)
    return instantiate_from_config(config)


def loss_and_grads(model, x0, cond, t, noise):
    model.zero_grad()
    loss, _ = model.p_losses(x0, cond, t, noise)
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.model.named_parameters()}


def batch():
    return torch.randn(4, 4, 8, 8), torch.randn(4, 77, 32), torch.tensor([0, 250, 600, 999])


def randomize(model):
    with torch.no_grad():  # random output convs too, so gradients reach every layer
        for p in model.model.parameters():
            p.normal_(0, 0.05)
    return model


def test_channels_last_gives_the_plain_loss_gradients_and_keys():
    plain, fast = randomize(tiny_model()), tiny_model(channels_last=True)
    fast.load_state_dict(plain.state_dict())
    conv = fast.model.diffusion_model.input_blocks[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert list(fast.state_dict()) == list(plain.state_dict())
    x0, cond, t = batch()
    noise = torch.randn_like(x0)
    (loss, grads), (fast_loss, fast_grads) = (
        loss_and_grads(m, x0, cond, t, noise) for m in (plain, fast)
    )
    torch.testing.assert_close(fast_loss, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(acceleration, "compile_unavailable", lambda: "no compiler in this test")
    with caplog.at_level(logging.WARNING):
        model = tiny_model(compile=True)
    assert "no compiler in this test" in caplog.text
    assert "forward" not in vars(model.model.diffusion_model)  # left as it was


def test_a_failing_compile_runs_eagerly(monkeypatch, caplog):
    def broken_compile(fn):
        def fails(*args, **kwargs):
            raise RuntimeError("backend exploded")

        return fails

    monkeypatch.setattr(acceleration, "compile_unavailable", lambda: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    plain, compiled = randomize(tiny_model()), tiny_model(compile=True)
    compiled.load_state_dict(plain.state_dict())
    x0, cond, t = batch()
    with caplog.at_level(logging.WARNING):
        out = compiled.apply_model(x0, t, cond)
    assert "backend exploded" in caplog.text
    torch.testing.assert_close(out, plain.apply_model(x0, t, cond))


def test_main_compile_flag_sets_the_model_option(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(acceleration, "compile_unavailable", lambda: "checked by the test")
    with caplog.at_level(logging.WARNING):
        trainer = main.main(
            [
                "--base",
                str(ROOT / "configs/tiny/txt2img.yaml"),
                "-t",
                "--no-test",
                "--compile",
                "-l",
                str(tmp_path),
                "--max_steps",
                "1",
                "data.params.batch_size=2",
                "data.params.num_workers=0",
                "lightning.trainer.limit_val_batches=0",
            ]
        )
    assert trainer.global_step == 1 and "checked by the test" in caplog.text
    (logdir,) = tmp_path.iterdir()
    assert "compile: true" in next(logdir.glob("configs/*-project.yaml")).read_text()


@pytest.mark.slow
def test_compiled_unet_matches_eager():
    if acceleration.compile_unavailable():
        pytest.skip(acceleration.compile_unavailable())
    one_level = {"channel_mult": [1], "attention_resolutions": [1]}  # fewer kernels to build
    plain = randomize(tiny_model(one_level))
    compiled = tiny_model(one_level, compile=True, channels_last=True)
    compiled.load_state_dict(plain.state_dict())
    x0, cond, t = batch()
    noise = torch.randn_like(x0)
    (loss, grads), (fast_loss, fast_grads) = (
        loss_and_grads(m, x0, cond, t, noise) for m in (plain, compiled)
    )
    assert not inspect.ismethod(vars(compiled.model.diffusion_model)["forward"])  # no fallback
    torch.testing.assert_close(fast_loss, loss, rtol=1e-4, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32():
    model = randomize(tiny_model()).eval()
    x0, cond, t = batch()
    with torch.no_grad():
        full = model.apply_model(x0, t, cond)
        with torch.autocast("cpu", torch.bfloat16):
            half = model.apply_model(x0, t, cond)
    assert half.dtype == torch.bfloat16
    relative = (half.float() - full).norm() / full.norm()
    assert relative < 0.02  # bf16 keeps 8 bits of mantissa: about 0.4 % per rounding


@pytest.mark.parametrize(
    "batch,size,kernel,stride,bias",
    [(1, 8, 3, 1, True), (2, 4, 3, 2, True), (3, 5, 1, 1, False), (1, 8, 3, 2, True)],
)
def test_small_wide_conv_as_gemm_matches_nn_conv2d(batch, size, kernel, stride, bias):
    from ldm.modules.diffusionmodules.util import Conv2d

    conv = Conv2d(256, 64, kernel, stride=stride, padding=kernel // 2, bias=bias)
    reference = torch.nn.Conv2d(256, 64, kernel, stride=stride, padding=kernel // 2, bias=bias)
    reference.load_state_dict(conv.state_dict())
    x = torch.randn(batch, 256, size, size, requires_grad=True)
    assert conv.use_gemm(x)
    outputs, grads = [], []
    for module in (conv, reference):
        y = module(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outputs.append(y)
        grads.append([x.grad.clone(), module.weight.grad.clone()])
        x.grad = None
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    for ours, theirs in zip(*grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        half = conv(x)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), outputs[1], rtol=0.05, atol=0.05)


def test_autocast_sampling_holds_the_unet_in_bf16_with_fp32_results_nearby():
    from scripts import common

    model = randomize(tiny_model()).eval()
    cond, x_T = torch.randn(2, 77, 32), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        full = model.sample(cond, 2, steps=5, x_T=x_T)
        common.prepare_for_precision(model, "autocast", torch.device("cpu"))
        assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
        with common.precision_scope("autocast", torch.device("cpu")):
            half = model.sample(cond, 2, steps=5, x_T=x_T)
    assert (half.float() - full).norm() / full.norm() < 0.05


def test_bf16_true_trains_samples_and_validates_through_main(tmp_path):
    """--precision bf16-true: weights in bfloat16; the batch's float images, the fp32 schedule's
    x_t and the conditioning reach each stage in its own dtype."""
    trainer = main.main(
        [
            "--base",
            str(ROOT / "configs/tiny/txt2img.yaml"),
            "-t",
            "--no-test",
            "--precision",
            "bf16-true",
            "-l",
            str(tmp_path),
            "--max_steps",
            "2",
            "data.params.batch_size=2",
            "data.params.num_workers=0",
            "lightning.trainer.limit_val_batches=1",
            "lightning.trainer.val_check_interval=2",
            "lightning.callbacks.image_logger.params.batch_frequency=2",
        ]
    )
    model = trainer.lightning_module
    assert (
        trainer.global_step == 2
        and model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    )
    assert torch.isfinite(trainer.callback_metrics["val/loss_simple_ema"])
    (logdir,) = tmp_path.iterdir()
    assert list((logdir / "images" / "train").glob("samples_cfg*_gs-000002_*.png"))
