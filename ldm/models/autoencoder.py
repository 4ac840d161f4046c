"""AutoencoderKL: the SD first stage, as a LightningModule that can also be trained.

Rombach et al. 2022, sec. 3.1 and appendix G: a KL-regularised autoencoder trained with
L1 + LPIPS reconstruction and a patch discriminator (`ldm.modules.losses`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.checkpoint import filter_keys, load_strictly
from ldm.diffusers_layout import read_weights
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import channels_first, instantiate_from_config

logger = logging.getLogger(__name__)

COMPAT_PARAMS: dict[str, str] = {}
# The training loss's state (LPIPS, discriminator, logvar) that original first-stage files carry;
# optional in a file either way, so inference models (`torch.nn.Identity` loss) load them too.
LOSS_PREFIX = "loss."
AUTOENCODER_LAYOUT = (
    "AutoencoderKL's own keys (encoder.*, decoder.*, quant_conv.*, post_quant_conv.*); "
    "ignore_keys: [prefix, ...] keeps weights under those prefixes as built"
)
# The SD autoencoder's base learning rate; main.py overrides it from the config.
DEFAULT_LEARNING_RATE = 4.5e-6
# Adam betas of the original autoencoder training (GAN practice).
ADAM_BETAS = (0.5, 0.9)


class AutoencoderKL(pl.LightningModule):
    """`encode(x) -> posterior`, `decode(z) -> image`; trains with `lossconfig`'s loss."""

    def __init__(
        self,
        ddconfig: Mapping,
        lossconfig: Mapping,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
    ):
        super().__init__()
        if colorize_nlabels is not None:
            raise NotImplementedError("AutoencoderKL: colorize_nlabels (segmentation maps)")
        if not ddconfig.get("double_z", True):
            raise ValueError(
                "AutoencoderKL: ddconfig.double_z must be true (mean and log-variance)"
            )
        self.automatic_optimization = False  # one step updates the autoencoder and the critic
        self.image_key, self.monitor, self.embed_dim = image_key, monitor, embed_dim
        self.learning_rate = DEFAULT_LEARNING_RATE
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def init_from_ckpt(
        self, path: str | os.PathLike, ignore_keys: Sequence[str] = (), *, unsafe_pickle=False
    ) -> None:
        """Load `path` into the built model; keys under `ignore_keys` keep their initial values.

        Every other weight must come from the file and every file key must fit the model,
        except the training loss's state (LOSS_PREFIX), which may be absent on either side.
        """
        state_dict = filter_keys(read_weights(path, self, unsafe_pickle=unsafe_pickle), ignore_keys)
        expected = self.state_dict()
        state_dict = {  # a loss state this model has no place for is left out
            k: v for k, v in state_dict.items() if k in expected or not k.startswith(LOSS_PREFIX)
        }
        optional = [*ignore_keys, LOSS_PREFIX]
        load_strictly(self, state_dict, str(path), optional, AUTOENCODER_LAYOUT)
        logger.info("AutoencoderKL: loaded %s", path)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] to the posterior over latents (B, embed_dim, h, w)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) to images (B, out_ch, H, W)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """(reconstruction, posterior); decodes a posterior sample, or its mode."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: Mapping, k: str) -> torch.Tensor:
        """Images (B, H, W, C) of the batch as float, contiguous (B, C, H, W); (B, H, W) as C=1."""
        return channels_first(batch[k])

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last weight, against which the loss balances its adversarial term."""
        return self.decoder.conv_out.weight

    def losses(self, batch: Mapping, split: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(autoencoder loss, discriminator loss, logs) of a batch."""
        x = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(x)
        step, last = self.global_step, self.get_last_layer()
        ae_loss, logs = self.loss(x, reconstructions, posterior, 0, step, last, split=split)
        d_loss, d_logs = self.loss(x, reconstructions, posterior, 1, step, split=split)
        return ae_loss, d_loss, {**logs, **d_logs}

    def training_step(self, batch: Mapping, batch_idx: int) -> torch.Tensor:
        """One optimizer step: the autoencoder's gradients from its loss, the critic's from its.

        The generator term also reaches the discriminator's weights; those gradients are
        dropped before the critic's own loss adds its gradients, as two optimizers would.
        Before `disc_start` neither term is computed; the critic's gradients are zeros, so
        Adam counts its steps as it would for the loss times 0.
        """
        optimizer = self.optimizers()
        ae_loss, d_loss, logs = self.losses(batch, "train")
        optimizer.zero_grad()
        self.manual_backward(ae_loss)
        critic_started = self.loss.gan_factor(self.global_step) > 0
        for p in self.loss.discriminator.parameters():
            p.grad = None if critic_started else torch.zeros_like(p)
        if critic_started:
            self.manual_backward(d_loss)
        optimizer.step()
        rec_loss = logs.pop("train/rec_loss")
        self.log_dict(logs, prog_bar=False, on_step=True, batch_size=len(batch[self.image_key]))
        self.log("train/rec_loss", rec_loss, prog_bar=True, batch_size=len(batch[self.image_key]))
        return ae_loss.detach()

    @torch.no_grad()
    def validation_step(self, batch: Mapping, batch_idx: int) -> None:
        _, _, logs = self.losses(batch, "val")
        self.log_dict(logs, on_epoch=True, batch_size=len(batch[self.image_key]))

    def configure_optimizers(self):
        ae_params = [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]
        if not hasattr(self.loss, "discriminator"):
            raise ValueError(
                f"AutoencoderKL: lossconfig {type(self.loss).__name__} cannot train; use "
                "ldm.modules.losses.LPIPSWithDiscriminator (torch.nn.Identity is for inference)"
            )
        groups = [{"params": ae_params}, {"params": list(self.loss.discriminator.parameters())}]
        return torch.optim.Adam(groups, lr=self.learning_rate, betas=ADAM_BETAS)

    @torch.no_grad()
    def log_images(self, batch: Mapping, n: int = 8) -> dict[str, torch.Tensor]:
        """Inputs, reconstructions and decoded random latents, (n, 3, H, W) in [-1, 1]."""
        x = self.get_input(batch, self.image_key)[:n].to(self.device)
        reconstructions, posterior = self(x)
        samples = self.decode(torch.randn_like(posterior.sample()))
        return {"inputs": x, "reconstructions": reconstructions, "samples": samples}


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """The name generative-models' first sd_xl_base.yaml gives its first stage: the same model
    (its `encode` returned a latent sample; LatentDiffusion samples the posterior itself)."""
