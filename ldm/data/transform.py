"""The image transform of the file-backed data sets: resize to cover a target size, crop to it
(centred or random), maybe flip, scale to [-1, 1]. An image's loss mask goes through the same
resize, crop and flip, so that it stays on its pixels.

Random crops and flips draw from `np.random`, which is seeded per item from (seed, epoch, index)
for map-style data (`ldm.data.sampler.SeededItems`) and per DataLoader worker for streamed data.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ldm.models.diffusion.conditioning import (
    CROP_KEY,
    LOSS_MASK_KEY,
    ORIGINAL_SIZE_KEY,
    TARGET_SIZE_KEY,
)
from ldm.util import ConfigError

CROPS = ("center", "random")
MASK_MODES = ("file", "alpha")
SMALL_IMAGES = ("upscale", "skip")
# What Pillow raises for truncated, corrupt or absurdly large files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

Size = tuple[int, int]  # (width, height) in pixels


def open_image(source: str | Path | bytes) -> Image.Image:
    """Fully decode an image file (path or bytes), honouring its EXIF orientation; mode kept."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()  # decode now, so corrupt data fails here and not in a later resize
        return ImageOps.exif_transpose(image)


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Fully decode an image file (path or bytes) to RGB, honouring its EXIF orientation."""
    return open_image(source).convert("RGB")


def full_mask(size: Size) -> Image.Image:
    """An 8-bit mask of `size` (width, height) that keeps every pixel."""
    return Image.new("L", size, 255)


def alpha_mask(image: Image.Image) -> Image.Image:
    """The image's alpha channel as an 8-bit mask (all 255 for an image without one)."""
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        return image.convert("RGBA").getchannel("A")
    return full_mask(image.size)


def check_options(where: str, masks: str | None, small_images: str) -> None:
    """A ConfigError naming `where` unless `masks` and `small_images` are known values."""
    if masks not in (None, *MASK_MODES) or small_images not in SMALL_IMAGES:
        raise ConfigError(
            f"{where}: masks {masks!r} / small_images {small_images!r}; expected masks in "
            f"{(None, *MASK_MODES)} and small_images in {SMALL_IMAGES}"
        )


def loss_mask(mode: str | None, image: Image.Image, source) -> Image.Image | None:
    """`image`'s loss mask for `masks: mode`: its alpha channel ("alpha"), the mask file or
    bytes `source` ("file"; None, no mask file: every pixel counts), or none."""
    if mode == "alpha":
        return alpha_mask(image)
    if mode == "file":
        return open_image(source) if source is not None else full_mask(image.size)
    return None


def captioned(pixels: dict[str, np.ndarray], caption: str) -> dict:
    """An item: the transform's arrays, the caption, and whether that caption is empty."""
    return {**pixels, "caption": caption, "empty_caption": int(not caption)}


def to_unit_range(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB image or array -> float32 array (H, W, 3) in [-1, 1]."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def to_mask_array(mask: Image.Image) -> np.ndarray:
    """8-bit mask -> float32 (H, W, 1) in [0, 1]: the weight of each pixel in the loss."""
    return (np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[:, :, None]


class ImageTransform:
    """Resize to cover `target` (default `size`×`size`), crop to it, maybe flip, scale."""

    def __init__(self, size: int, crop: str = "center", flip_p: float = 0.0) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"param 'size' must be a positive int (pixels), got {size!r}")
        if crop not in CROPS:
            raise ValueError(f"param 'crop' must be one of {CROPS}, got {crop!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"param 'flip_p' must be a probability in [0, 1], got {flip_p!r}")
        self.size, self.crop, self.flip_p = size, crop, flip_p

    def __call__(
        self, image: Image.Image, target: Size | None = None, mask: Image.Image | None = None
    ) -> dict[str, np.ndarray]:
        """`{"image": float32 (H, W, 3) in [-1, 1]}` at target (W, H), plus `"loss_mask"`
        (H, W, 1) in [0, 1] when a mask (of the image's size) is given, and SDXL's size
        entries (`micro_conditioning`)."""
        target = target or (self.size, self.size)
        original = image.size
        image = resize_to_cover(image.convert("RGB"), target, Image.Resampling.BICUBIC)
        box = self.crop_box(image.size, target)
        flip = self.flip_p > 0 and np.random.random() < self.flip_p
        out = {"image": to_unit_range(crop_and_flip(image, box, flip))}
        out |= micro_conditioning(original, image.size, box, flip)
        if mask is not None:
            mask = resize_to_cover(mask.convert("L"), target, Image.Resampling.BILINEAR)
            out[LOSS_MASK_KEY] = to_mask_array(crop_and_flip(mask, box, flip))
        return out

    def crop_box(self, size: Size, target: Size) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the `target` crop, centred or uniformly random."""
        (width, height), (crop_w, crop_h) = size, target
        if self.crop == "center":
            left, top = (width - crop_w) // 2, (height - crop_h) // 2
        else:
            left = np.random.randint(0, width - crop_w + 1)
            top = np.random.randint(0, height - crop_h + 1)
        return left, top, left + crop_w, top + crop_h


def micro_conditioning(original: Size, resized: Size, box, flip: bool) -> dict[str, np.ndarray]:
    """SDXL's size entries of a crop `box` (left, top, right, bottom) of the image resized from
    `original` to `resized` (width, height), each float32 (2,) as (height, width) or (top,
    left); a flip mirrors the crop's left edge, as the flipped image holds it."""
    left, top, right, bottom = box
    return {
        ORIGINAL_SIZE_KEY: np.array([original[1], original[0]], dtype=np.float32),
        CROP_KEY: np.array([top, resized[0] - right if flip else left], dtype=np.float32),
        TARGET_SIZE_KEY: np.array([bottom - top, right - left], dtype=np.float32),
    }


def resize_to_cover(image: Image.Image, target: Size, resample) -> Image.Image:
    """Scale (keeping the aspect ratio) to the smallest size that covers `target`."""
    (width, height), (target_w, target_h) = image.size, target
    scale = max(target_w / width, target_h / height)
    if scale == 1:
        return image
    size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
    return image.resize(size, resample)


def crop_and_flip(image: Image.Image, box: tuple[int, int, int, int], flip: bool) -> Image.Image:
    image = image.crop(box)
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else image
