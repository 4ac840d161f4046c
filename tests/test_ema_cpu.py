"""The EMA's options: kept on the CPU (`ema_device: cpu`), moved every K steps
(`ema_update_every`), with its own decay (`ema_decay_rate`).

The CPU copy must be the default EMA's twin: the same numbers with K = 1, the same checkpoint
keys, a closed form with K > 1 (the per-step warm-up and decay ** K), an exact resume, and it
must stay on the CPU, in fp32, whatever `.to()` does to the model.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, RandomImages, load_config
from torch import nn

import main
from ldm import inference
from ldm.checkpoint import ema_buffer_name, ema_key, load_weights, swap_in_ema
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, instantiate_from_config

SCALARS = ("decay", "num_updates")  # LitEma's state besides the shadow weights


def build(**params):
    """The tiny txt2img LatentDiffusion, with the same initial weights on every call."""
    config = load_config("tiny/txt2img.yaml").model
    config.params.update(params)
    torch.manual_seed(0)
    return instantiate_from_config(config)


class Record(pl.Callback):
    """The UNet's weights and the EMA's state after each optimizer step."""

    def __init__(self):
        self.weights, self.emas = [], []

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})
        self.emas.append({k: v.clone() for k, v in pl_module.model_ema.state_dict().items()})


def fit(model, root, steps: int, accelerator: str = "cpu", callbacks=()) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        callbacks=list(callbacks),
    )
    trainer.fit(model, torch.utils.data.DataLoader(RandomImages(2 * steps, seed=1), batch_size=2))


def ema_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model_ema.state_dict().items()}


@pytest.mark.parametrize(
    "params,key",
    [
        ({"ema_device": "cuda"}, "ema_device"),
        ({"ema_device": "gpu", "use_ema": False}, "ema_device"),
        ({"ema_update_every": 0}, "ema_update_every"),
        ({"ema_update_every": 2.5}, "ema_update_every"),
        ({"ema_update_every": True}, "ema_update_every"),
        ({"ema_decay_rate": 1.5}, "ema_decay_rate"),
        ({"ema_decay_rate": -0.1}, "ema_decay_rate"),
        ({"ema_decay_rate": "high", "use_ema": False}, "ema_decay_rate"),
        ({"ema_decay_rate": True}, "ema_decay_rate"),
    ],
)
def test_bad_options_fail_naming_the_key(params, key):
    with pytest.raises(ConfigError, match=f"^{key} "):
        build(**params)


def test_the_cpu_ema_has_the_default_keys_and_loads_both_ways():
    default, cpu = build(), build(ema_device="cpu")
    assert [n for n, _ in cpu.named_buffers() if n.startswith("model_ema.")] == []
    ours, theirs = cpu.state_dict(), default.state_dict()
    assert list(ours) == list(theirs)  # same keys, same order
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {
        k: (v.shape, v.dtype) for k, v in theirs.items()
    }
    with torch.no_grad():
        for value in default.model_ema.buffers():
            value.add_(1)  # something the CPU copy does not hold yet
    cpu.load_state_dict(default.state_dict(), strict=True)
    for key, value in default.state_dict().items():
        assert torch.equal(cpu.state_dict()[key], value), key
    load_weights(build(ema_device="cpu", use_ema=False), swap_in_ema(cpu.state_dict())[0])
    fresh = build()
    fresh.load_state_dict(cpu.state_dict(), strict=True)
    assert torch.equal(fresh.model_ema.num_updates, cpu.model_ema.num_updates)


def test_a_meta_build_checks_the_cpu_ema_keys_without_allocating():
    """As `convert.py` and `inference.load_model` check a file against a config."""
    with torch.device("meta"):
        default, cpu = build(), build(ema_device="cpu")
    assert all(v.is_meta for v in cpu.model_ema.state_dict().values())
    ours, theirs = cpu.state_dict(), default.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_the_cpu_ema_stays_in_fp32_on_the_cpu_when_the_model_moves():
    model = build(ema_device="cpu")
    before = ema_state(model)
    model.double()
    assert model.model.diffusion_model.out[2].weight.dtype == torch.float64
    model.to(torch.float16)
    model.to(torch.device("meta"))
    assert model.model.diffusion_model.out[2].weight.is_meta
    for key, value in model.model_ema.state_dict().items():
        assert value.device.type == "cpu" and torch.equal(value, before[key]), key
    default = build().double()  # the original's buffers follow the model
    assert default.model_ema.state_dict()["diffusion_modelout2weight"].dtype == torch.float64


def test_ema_scope_copies_the_cpu_ema_in_and_restores_the_weights():
    model = build(ema_device="cpu").double()  # fp64 weights, fp32 EMA: another "device"
    with torch.no_grad():
        for p in model.model.parameters():
            p.add_(1)
    raw = {n: p.detach().clone() for n, p in model.model.named_parameters()}
    shadows = model.model_ema.state_dict()
    with model.ema_scope():
        for name, p in model.model.named_parameters():
            assert torch.equal(p, shadows[ema_buffer_name(name)].double()), name
        assert all(saved.device.type == "cpu" for saved in model.model_ema.collected_params)
    for name, p in model.model.named_parameters():
        assert torch.equal(p, raw[name]), name


def test_with_k_1_the_cpu_ema_equals_the_default_after_training(tmp_path):
    initial = ema_state(build())
    emas = {}
    for device in (None, "cpu"):
        model = build(ema_device=device)
        fit(model, tmp_path, steps=3)
        emas[device] = ema_state(model)
    assert emas["cpu"]["num_updates"].item() == 3
    for key, value in emas[None].items():
        assert torch.equal(emas["cpu"][key], value), key
    moved = [k for k in initial if not torch.equal(initial[k], emas["cpu"][k])]
    assert len(moved) > len(initial) // 2  # it did follow the weights


def warm_up_decay(decay: float, every: int) -> Callable[[int], float]:
    """The closed form's decay of a move at `step`: the product of LitEma's per-step decays
    min(decay, (1 + n) / (10 + n)) over the `every` steps n since the last move."""

    def at(step: int) -> float:
        steps = range(step - every + 1, step + 1)
        return math.prod(min(decay, (1 + n) / (10 + n)) for n in steps)

    return at


def held_ema(initial: dict, weights: list[dict], every: int, decay_at) -> dict:
    """In float64: at steps K, 2K, ... the EMA moves towards that step's weights by
    1 - decay_at(step); nothing happens in between."""
    ema = {k: v.double() for k, v in initial.items() if k not in SCALARS}
    for step in range(every, len(weights) + 1, every):
        d = decay_at(step)
        for name, w in weights[step - 1].items():
            key = ema_buffer_name(name)
            ema[key] = d * ema[key] + (1 - d) * w.double()
    return ema


@pytest.mark.parametrize("device", [None, "cpu"])
def test_with_k_3_the_ema_moves_every_3_steps_by_the_closed_form(tmp_path, device):
    every, steps, decay = 3, 13, 0.5  # warm-up (1+n)/(10+n) < 0.5 until n = 8, then decay**3
    model = build(ema_device=device, ema_update_every=every, ema_decay_rate=decay)
    model.learning_rate = 1e-2  # weights that move far enough to tell decays apart
    initial = ema_state(model)
    record = Record()
    fit(model, tmp_path, steps, callbacks=[record])
    previous = initial
    for step, ema in enumerate(record.emas, start=1):
        shadows = [k for k in ema if k not in SCALARS]
        moved = [k for k in shadows if not torch.equal(ema[k], previous[k])]
        assert ema["num_updates"].item() == step
        assert len(moved) == (len(shadows) if step % every == 0 else 0), step
        previous = ema
    expected = held_ema(initial, record.weights, every, warm_up_decay(decay, every))
    for key, value in expected.items():
        torch.testing.assert_close(previous[key].double(), value, atol=1e-6, rtol=0, msg=key)

    def per_move(step: int) -> float:  # the warm-up counted in moves, decay not raised to K
        moves = step // every
        return min(decay, (1 + moves) / (10 + moves))

    wrong = held_ema(initial, record.weights, every, per_move)  # the comparison can tell
    assert max((previous[k].double() - wrong[k]).abs().max() for k in wrong) > 1e-4


@pytest.mark.parametrize("warm_up", [True, False])
def test_every_k_is_the_per_step_ema_of_weights_held_between_moves(warm_up):
    """The time constant in steps does not depend on K: per step, the EMA sees the weights of
    the step where it next moves."""
    toy = nn.Linear(4, 3)
    every = LitEma(toy, 0.4, warm_up, every=4, device="cpu")  # warm-up over at n = 5
    per_step = LitEma(toy, 0.4, warm_up)
    g = torch.Generator().manual_seed(0)
    weights = [[torch.randn(p.shape, generator=g) for p in toy.parameters()] for _ in range(12)]
    for step in range(12):
        held = weights[step // 4 * 4 + 3]
        with torch.no_grad():
            for p, w in zip(toy.parameters(), held, strict=True):
                p.copy_(w)
        per_step(toy)
        with torch.no_grad():
            for p, w in zip(toy.parameters(), weights[step], strict=True):
                p.copy_(w)
        every(toy)
    for key, value in per_step.state_dict().items():
        torch.testing.assert_close(every.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.slow
def test_main_saves_and_resumes_the_cpu_ema_exactly_and_the_scripts_load_it(tmp_path):
    options = ["model.params.ema_device=cpu", "model.params.ema_update_every=2"]
    options.append("model.params.ema_decay_rate=0.99")
    small = ["data.params.batch_size=4", "data.params.num_workers=0"]
    small += ["lightning.trainer.limit_val_batches=1", *options]

    def run(root, *args):
        base = ["--base", str(ROOT / "configs" / "tiny" / "txt2img.yaml"), "-l", str(root)]
        return main.main([*base, "-t", "--no-test", "-s", "7", *args, *small])

    whole = run(tmp_path / "whole", "--max_steps", "5")
    run(tmp_path / "parts", "--max_steps", "3")  # saved between two moves (num_updates 3)
    (logdir,) = sorted((tmp_path / "parts").iterdir())
    resumed = main.main(["-r", str(logdir), "-t", "--no-test", "--max_steps", "5", *small])
    model = resumed.lightning_module
    assert model.model_ema.num_updates.item() == 5
    assert model.model_ema.decay.item() == pytest.approx(0.99)
    assert [n for n, _ in model.named_buffers() if n.startswith("model_ema.")] == []
    assert all(v.device.type == "cpu" for v in model.model_ema.state_dict().values())
    reference = whole.lightning_module.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=0, rtol=0, msg=key)
    checkpoint = torch.load(logdir / "checkpoints" / "last.ckpt", weights_only=False)
    assert list(checkpoint["state_dict"]) == list(build().state_dict())
    loaded, _ = inference.load_model(logdir)
    for key, value in loaded.state_dict().items():
        if key.startswith("model."):
            assert torch.equal(value, checkpoint["state_dict"][ema_key(key)]), key


@pytest.mark.gpu
def test_on_cuda_the_ema_stays_on_the_cpu_and_the_peak_memory_drops(tmp_path):
    peaks, emas = {}, {}
    for device in ("cpu", None):
        model = build(ema_device=device)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fit(model, tmp_path, steps=3, accelerator="gpu")
        peaks[device] = torch.cuda.max_memory_allocated() - base
        emas[device] = {k: v.cpu() for k, v in model.model_ema.state_dict().items()}
        if device == "cpu":
            assert model.device.type == "cuda"
            assert all(v.device.type == "cpu" for v in model.model_ema.state_dict().values())
            with model.ema_scope():
                for name, p in model.model.named_parameters():
                    assert p.is_cuda and torch.equal(p.cpu(), emas["cpu"][ema_buffer_name(name)])
                saved = model.model_ema.collected_params  # the weights, put aside on the host
                assert saved and all(s.device.type == "cpu" for s in saved)
        del model
    ema_bytes = sum(
        v.numel() * v.element_size() for k, v in emas["cpu"].items() if k not in SCALARS
    )
    assert peaks[None] - peaks["cpu"] >= 0.9 * ema_bytes, (peaks, ema_bytes)
    for key, value in emas[None].items():
        torch.testing.assert_close(emas["cpu"][key], value, atol=1e-5, rtol=1e-5, msg=key)
