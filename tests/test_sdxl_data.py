"""SDXL's micro-conditioning from the data: each item's original size, crop corner and target
size, true of the pixels it holds (checked by redoing the resize and crop with Pillow), through
buckets, random crops and flips, and into the engine's size vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_sdxl_engine import tiny_engine

from ldm.data.folder import ImageCaptionFolder
from ldm.models.diffusion.conditioning import CROP_KEY, ORIGINAL_SIZE_KEY, TARGET_SIZE_KEY
from ldm.modules.encoders.modules import ConcatTimestepEmbedderND


def noise_image(path, width: int, height: int, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.with_suffix(".txt").write_text("a noisy picture")


def pillow_crop(path, target: tuple[int, int], top: int, left: int, flip: bool) -> np.ndarray:
    """The target (w, h) crop at (top, left) of the image resized to cover it, as float."""
    image = Image.open(path).convert("RGB")
    scale = max(target[0] / image.width, target[1] / image.height)
    size = (max(target[0], round(image.width * scale)), max(target[1], round(image.height * scale)))
    resized = image.resize(size, Image.Resampling.BICUBIC)
    if flip:
        resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    crop = resized.crop((left, top, left + target[0], top + target[1]))
    return np.asarray(crop, dtype=np.float32) / 127.5 - 1.0


@pytest.mark.parametrize(
    "crop,flip_p,buckets",
    [
        ("center", 0.0, None),
        ("random", 0.0, None),
        ("random", 1.0, None),
        ("random", 0.0, {"resolution": 64, "step": 16, "min_side": 32, "max_side": 128}),
    ],
    ids=["center", "random", "random-flipped", "buckets"],
)
def test_items_carry_their_true_original_size_crop_corner_and_target_size(
    tmp_path, crop, flip_p, buckets
):
    noise_image(tmp_path / "wide.png", 90, 50)
    np.random.seed(3)
    data = ImageCaptionFolder(tmp_path, size=40, crop=crop, flip_p=flip_p, buckets=buckets)
    item = data[0]
    height, width = item["image"].shape[:2]
    assert tuple(item[ORIGINAL_SIZE_KEY]) == (50, 90)  # (height, width) of the file
    assert tuple(item[TARGET_SIZE_KEY]) == (height, width)
    top, left = (int(v) for v in item[CROP_KEY])
    expected = pillow_crop(tmp_path / "wide.png", (width, height), top, left, flip_p == 1.0)
    np.testing.assert_allclose(item["image"], expected, atol=1e-6)
    if crop == "center" and buckets is None:
        assert (top, left) == (0, 16)  # 90 x 50 covers 40 x 40 at 72 x 40: 16 px off each side
    if buckets is not None:
        assert width > height  # a landscape bucket


def test_the_engine_conditions_on_the_batch_sizes():
    engine = tiny_engine().eval()
    sizes = {
        ORIGINAL_SIZE_KEY: torch.tensor([[50.0, 90.0], [1024.0, 768.0]]),
        CROP_KEY: torch.tensor([[0.0, 16.0], [8.0, 0.0]]),
        TARGET_SIZE_KEY: torch.tensor([[32.0, 32.0], [32.0, 32.0]]),
    }
    batch = {"image": torch.zeros(2, 32, 32, 3), "caption": ["a", "b"], **sizes}
    _, cond = engine.get_input(batch)
    embed = ConcatTimestepEmbedderND(4)
    expected = torch.cat(
        [embed(sizes[k]) for k in (ORIGINAL_SIZE_KEY, CROP_KEY, TARGET_SIZE_KEY)], 1
    )
    torch.testing.assert_close(cond["c_adm"][:, 48:], expected)
