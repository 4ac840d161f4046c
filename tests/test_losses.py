"""Autoencoder loss: LPIPS parity with the lpips package, PatchGAN, the two loss phases."""

from __future__ import annotations

import os

import pytest
import torch

from ldm.checkpoint import save_checkpoint
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.modules.losses.contperceptual import hinge_d_loss, vanilla_d_loss
from ldm.modules.losses.discriminator import NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS

lpips = pytest.importorskip("lpips")


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    """A random-VGG reference LPIPS (no download) and its weights as the two files we read."""
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    folder = tmp_path_factory.mktemp("lpips")
    features = {
        f"features.{k.split('.', 1)[1]}": v
        for k, v in reference.net.state_dict().items()
        if k.startswith("slice")
    }
    save_checkpoint(features, folder / "vgg16.safetensors")
    lin_path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
    return reference, str(folder / "vgg16.safetensors"), lin_path


def test_lpips_matches_the_lpips_package(lpips_files):
    reference, vgg_path, lin_path = lpips_files
    ours = LPIPS(vgg_path, lin_path)
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
        torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
    )
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), reference(x, y), atol=1e-5, rtol=1e-4)
        assert ours(x, x).abs().max() < 1e-6
    assert not any(p.requires_grad for p in ours.parameters())


def test_lpips_without_weight_files_says_what_to_provide():
    with pytest.raises(
        FileNotFoundError, match="lpips_vgg_path.*vgg16-397923af.pth.*perceptual_weight: 0"
    ):
        LPIPS(None, None)
    with pytest.raises(FileNotFoundError, match="lpips_vgg_path"):
        LPIPSWithDiscriminator(disc_start=0)


def test_patchgan_gives_a_grid_of_logits():
    disc = NLayerDiscriminator(3, ndf=8, n_layers=2)
    assert disc(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_discriminator_losses_at_known_logits():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.5))
    expected = 0.5 * (
        torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake).mean()
    )
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())


def phases(loss, global_step):
    inputs = torch.rand(2, 3, 16, 16) * 2 - 1
    last_layer = torch.nn.Parameter(torch.randn(3, 4, 3, 3))
    reconstructions = torch.nn.functional.conv2d(torch.randn(2, 4, 16, 16), last_layer, padding=1)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    ae_loss, ae_logs = loss(
        inputs, reconstructions, posterior, 0, global_step, last_layer=last_layer
    )
    d_loss, d_logs = loss(inputs, reconstructions, posterior, 1, global_step)
    return ae_loss, ae_logs, d_loss, d_logs


def test_gan_terms_start_at_disc_start_with_an_adaptive_weight():
    loss = LPIPSWithDiscriminator(
        disc_start=10, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2
    )
    ae_loss, logs, d_loss, _ = phases(loss, global_step=5)
    assert logs["train/disc_factor"] == 0 and logs["train/d_weight"] == 0 and d_loss == 0
    # before disc_start the loss is the L1 NLL (logvar 0: summed over 3 x 16 x 16) plus the KL
    nll = logs["train/rec_loss"].item() * 3 * 16 * 16
    assert logs["train/nll_loss"].item() == pytest.approx(nll, rel=1e-5)
    assert ae_loss.item() == pytest.approx(nll + logs["train/kl_loss"].item(), rel=1e-5)
    ae_loss, logs, d_loss, d_logs = phases(loss, global_step=10)
    assert logs["train/disc_factor"] == 1 and logs["train/d_weight"] > 0 and d_loss > 0
    assert {"train/logits_real", "train/logits_fake"} <= set(d_logs)


def test_pixel_loss_weight_is_used():
    inputs, recon = torch.zeros(1, 3, 4, 4), torch.ones(1, 3, 4, 4)
    nll = [
        LPIPSWithDiscriminator(
            0, perceptual_weight=0.0, pixelloss_weight=w, disc_ndf=8
        ).reconstruction_nll(inputs, recon)
        for w in (1.0, 2.0)
    ]
    torch.testing.assert_close(nll[1], 2 * nll[0])


def test_unsupported_options_are_named():
    with pytest.raises(NotImplementedError, match="use_actnorm"):
        LPIPSWithDiscriminator(0, perceptual_weight=0.0, use_actnorm=True)
    with pytest.raises(ValueError, match="disc_loss 'wgan'"):
        LPIPSWithDiscriminator(0, perceptual_weight=0.0, disc_loss="wgan")
