"""LPIPS perceptual distance on VGG16 features (Zhang et al. 2018), loaded from local files.

Nothing is downloaded: the VGG16 backbone weights (torchvision's `vgg16-397923af.pth`) and
the LPIPS linear-layer weights (`vgg.pth` of the lpips package, keys `lin{i}.model.1.weight`)
are files the user provides.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchvision.models import vgg16

from ldm.checkpoint import load_weights, read_state_dict

VGG_CHANNELS = (64, 128, 256, 512, 512)
# Ends of the VGG16 `features` slices: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG_SLICE_ENDS = (4, 9, 16, 23, 30)
# Inputs in [-1, 1] are shifted and scaled to the statistics the LPIPS layers were trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
MISSING_WEIGHTS = (
    "LPIPS needs two local weight files: `lpips_vgg_path`, torchvision's VGG16 ImageNet weights "
    "(vgg16-397923af.pth), and `lpips_lin_path`, the LPIPS linear layers (vgg.pth shipped in "
    "the lpips package). Set both in the loss config, or set perceptual_weight: 0."
)


class NetLinLayer(nn.Module):
    """Dropout and a 1x1 conv to one channel: the learned per-channel weights of LPIPS."""

    def __init__(self, channels: int, use_dropout: bool = True):
        super().__init__()
        dropout = [nn.Dropout()] if use_dropout else [nn.Identity()]
        self.model = nn.Sequential(*dropout, nn.Conv2d(channels, 1, 1, bias=False))


def unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Normalise features to unit length along channels."""
    return x / (x.square().sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Learned perceptual distance: `forward(x, y) -> (B, 1, 1, 1)`, inputs in [-1, 1]."""

    def __init__(self, vgg_path: str | None, lin_path: str | None, use_dropout: bool = True):
        super().__init__()
        for name, path in (("lpips_vgg_path", vgg_path), ("lpips_lin_path", lin_path)):
            if not path or not os.path.isfile(path):
                raise FileNotFoundError(f"{name}={path!r} is not a file. {MISSING_WEIGHTS}")
        self.register_buffer("shift", torch.tensor(SHIFT)[None, :, None, None])
        self.register_buffer("scale", torch.tensor(SCALE)[None, :, None, None])
        self.net = vgg16(weights=None).features[: VGG_SLICE_ENDS[-1]]
        self.lins = nn.ModuleList(NetLinLayer(c, use_dropout) for c in VGG_CHANNELS)
        vgg = read_state_dict(vgg_path)
        features = {k[len("features.") :]: v for k, v in vgg.items() if k.startswith("features.")}
        load_weights(self.net, features)
        lins = read_state_dict(lin_path)
        load_weights(self.lins, {k[len("lin") :]: v for k, v in lins.items()})
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised VGG activations at the five LPIPS taps."""
        x, taps, start = (x - self.shift) / self.scale, [], 0
        for end in VGG_SLICE_ENDS:
            x = self.net[start:end](x)
            taps.append(unit_normalize(x))
            start = end
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        distance = 0
        for lin, fx, fy in zip(self.lins, self.features(x), self.features(y), strict=True):
            distance = distance + lin.model((fx - fy).square()).mean(dim=(2, 3), keepdim=True)
        return distance  # (B, 1, 1, 1)
