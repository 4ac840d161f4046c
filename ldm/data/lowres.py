"""Training items for latent upscalers: any image data set, with its image downsampled.

    train:
      target: ldm.data.lowres.LowResolution
      params:
        factor: 4
        key: lr
        dataset: {target: ldm.data.synthetic.SyntheticShapes, params: {size: 32}}

Each item gains `key`, the image (H, W, 3) in [-1, 1] downsampled `factor` times to
(H / factor, W / factor, 3) by area averaging (each low-res pixel is the mean of its
factor x factor block: the box filter, without aliasing), the batch key
`LatentUpscaleDiffusion` reads as `low_scale_key`. For the x4 upscaler `factor` is the first
stage's (4), so that the low-res image sits at the latent grid's size. The original trained
on degraded crops (bicubic downsampling with blur, noise and JPEG artefacts); this keeps to
the clean downsampling, so that what the model learns is the upscaling alone.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from torch.utils.data import Dataset

from ldm.util import ConfigError, instantiate_from_config


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, C) to (H / factor, W / factor, C) float32: the mean of each factor x factor block."""
    height, width, channels = image.shape
    blocks = image.reshape(height // factor, factor, width // factor, factor, channels)
    return blocks.mean(axis=(1, 3), dtype=np.float32)  # (H / f, W / f, C)


class LowResolution(Dataset):
    """`dataset`'s items with their `image` downsampled `factor` times added under `key`.

    Args:
        dataset: the `{target, params}` of an image data set (items with an `image`).
        factor: the downsampling factor; the image's sides must be multiples of it.
        key: the item key of the low-res image (the model's `low_scale_key`).
    """

    def __init__(self, dataset: Mapping, factor: int = 4, key: str = "lr"):
        if not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"LowResolution: factor {factor!r} must be a positive integer")
        self.dataset = instantiate_from_config(dataset)
        self.factor, self.key = factor, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = dict(self.dataset[index])
        image = np.asarray(item["image"], np.float32)  # (H, W, 3) in [-1, 1]
        height, width = image.shape[:2]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"LowResolution: item {index}'s image is {height}x{width} px, not a multiple of "
                f"factor {self.factor} on each side: size the data set's images to one"
            )
        return {**item, self.key: area_downsample(image, self.factor)}
