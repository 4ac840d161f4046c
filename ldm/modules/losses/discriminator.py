"""PatchGAN discriminator (Isola et al. 2017, pix2pix) as used by the SD autoencoder's loss."""

from __future__ import annotations

from torch import nn

# Kernel size and padding of every PatchGAN conv.
KERNEL, PAD = 4, 1
MAX_WIDTH_MULT = 8


def init_weights(module: nn.Module) -> None:
    """DCGAN initialisation: N(0, 0.02) convs, N(1, 0.02) batch-norm scales."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """Maps images (B, C, H, W) to a grid of real/fake logits (B, 1, h, w)."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(input_nc, ndf, KERNEL, 2, PAD), nn.LeakyReLU(0.2, True)]
        width = ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2**n, MAX_WIDTH_MULT)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(width, out, KERNEL, stride, PAD, bias=False),
                nn.BatchNorm2d(out),
                nn.LeakyReLU(0.2, True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, KERNEL, 1, PAD))
        self.main = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x):
        return self.main(x)
