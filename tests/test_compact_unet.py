"""The compact pixel-space U-Net and the pixel DDPM config that trains it."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, fit_fixed_batch, load_config

import main
from ldm.data.synthetic import SyntheticShapes
from ldm.modules.diffusionmodules.compact_unet import Attention, CompactUNet, sinusoidal_embedding
from ldm.util import instantiate_from_config


def test_output_shape_and_every_parameter_gets_a_gradient():
    unet = CompactUNet(dim=16, dim_mults=(1, 2, 4), in_channels=3, attn_dim_head=8)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    out = unet(x, t)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())


def test_out_channels_and_bad_sizes():
    unet = CompactUNet(dim=8, dim_mults=(1, 2), in_channels=4, out_channels=2, attn_dim_head=8)
    assert unet(torch.randn(1, 4, 8, 8), torch.tensor([1])).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(torch.randn(1, 4, 9, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="unconditional"):
        unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), context=torch.randn(1, 3, 8))


def test_time_embedding_tells_timesteps_apart_and_attention_is_permutation_equivariant():
    emb = sinusoidal_embedding(torch.tensor([0, 1, 999]), 16)
    assert emb.shape == (3, 16) and torch.allclose(emb[0, 8:], torch.ones(8))
    assert (emb[1] - emb[2]).abs().max() > 0.1
    for linear in (True, False):
        attn = Attention(8, heads=2, dim_head=4, linear=linear).eval()
        x = torch.randn(1, 8, 4, 4)
        flipped = attn(x.flip(-1)).flip(-1)  # attention over pixels ignores their order
        torch.testing.assert_close(flipped, attn(x), atol=1e-5, rtol=1e-5)


def test_pixel_ddpm_config_learns_and_samples():
    model = instantiate_from_config(load_config("ddpm/shapes.yaml").model)
    data = SyntheticShapes(size=32, length=8)
    x0 = torch.stack([torch.from_numpy(data[i]["image"]) for i in range(8)]).permute(0, 3, 1, 2)
    t, noise = torch.randint(0, 1000, (8,)), torch.randn(8, 3, 32, 32)
    losses, _ = fit_fixed_batch(model, x0, None, t, noise, steps=30, lr=1e-3)
    assert losses[-1] < 0.6 * losses[0], losses
    images = model.log_images({"image": x0.permute(0, 2, 3, 1)}, n=2, steps=3)
    assert images["samples"].shape == (2, 3, 32, 32) and images["inputs"].shape == (2, 3, 32, 32)


@pytest.mark.slow
def test_pixel_ddpm_trains_through_main(tmp_path):
    trainer = main.main(
        [
            "--base",
            str(ROOT / "configs" / "ddpm" / "shapes.yaml"),
            "-t",
            "--max_steps",
            "2",
            "--no-test",
            "-l",
            str(tmp_path),
            "data.params.batch_size=4",
            "data.params.num_workers=0",
            "lightning.trainer.limit_val_batches=1",
        ]
    )
    assert trainer.global_step == 2
    (logdir,) = tmp_path.iterdir()
    assert (logdir / "checkpoints" / "last.ckpt").is_file()


class Spy(torch.nn.Module):
    """Wraps the UNet, recording each call's input."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet, self.inputs = unet, []

    def forward(self, x, timesteps, context=None):
        self.inputs.append(x.detach().clone())
        return self.unet(x, timesteps)


def spied_model():
    model = instantiate_from_config(load_config("ddpm/shapes.yaml").model)
    spy = Spy(model.model.diffusion_model)
    model.model.diffusion_model = spy
    return model, spy


def test_self_conditioning_trains_on_its_own_detached_estimate_half_the_time():
    model, spy = spied_model()
    x0, t = torch.rand(2, 3, 32, 32) * 2 - 1, torch.tensor([100, 700])
    double = 0
    for _ in range(40):
        spy.inputs.clear()
        model.p_losses(x0, None, t)
        assert len(spy.inputs) in (1, 2)
        assert spy.inputs[0][:, 3:].abs().max() == 0  # the first pass sees zeros
        if len(spy.inputs) == 2:
            double += 1
            assert spy.inputs[1][:, 3:].abs().max() > 0  # the second sees the first's x0
    assert 8 <= double <= 32
    model.eval()
    spy.inputs.clear()
    model.p_losses(x0, None, t)
    assert len(spy.inputs) == 1  # validation: one pass, no estimate


def test_samplers_feed_back_the_previous_x0_estimate():
    model, spy = spied_model()
    with torch.no_grad():
        model.sample(None, 1, steps=3)
    assert len(spy.inputs) == 3 and spy.inputs[0][:, 3:].abs().max() == 0
    assert all(x[:, 3:].abs().max() > 0 for x in spy.inputs[1:])


def test_self_conditioning_needs_the_doubled_input():
    config = load_config("ddpm/shapes.yaml").model
    config.params.unet_config.params.in_channels = 3
    with pytest.raises(ValueError, match="in_channels must be 6, got 3"):
        instantiate_from_config(config)
