"""A folder of captioned images as a map-style data set, square-cropped or in aspect-ratio
buckets (`ldm.data.buckets`), with optional caption augmentation and loss masks.

Captions come from a sibling `name.txt` per image, or from a `metadata.jsonl` in the root with
one `{"file_name": ..., "text": ...}` per line (the Hugging Face image-folder convention), or
one `caption` for all. A loss mask is a sibling `name.mask.png` (`masks: file`; files named
`*.mask.*` are never taken for images) or the image's alpha channel (`masks: alpha`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ldm.data.buckets import BucketSpec, Size, bucket_summary, cover_scale, image_size
from ldm.data.captions import CaptionOptions
from ldm.data.transform import (
    IMAGE_ERRORS,
    ImageTransform,
    captioned,
    check_options,
    loss_mask,
    open_image,
    open_rgb,
    to_unit_range,
)

__all__ = ["IMAGE_ERRORS", "ImageCaptionFolder", "ImageTransform", "open_rgb", "to_unit_range"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
MASK_SUFFIX = ".mask.png"
MAX_LISTED = 5  # file names quoted in an error message before "and N more"


def list_some(items: Sequence[object]) -> str:
    """The first few items of a list, and how many more there are."""
    shown = ", ".join(str(item) for item in items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return shown + (f" and {rest} more" if rest > 0 else "")


def is_mask_file(path: Path) -> bool:
    return path.stem.lower().endswith(".mask")


def mask_path(image: Path) -> Path:
    """The sibling mask file of an image: `photo.jpg` -> `photo.mask.png`."""
    return image.with_name(image.stem + MASK_SUFFIX)


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in sorted order (mask files left out)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not is_mask_file(p)
    )


def read_metadata(path: Path, caption_key: str) -> tuple[list[Path], list[str]]:
    """(image paths, captions) from a metadata.jsonl of `file_name` + `caption_key` lines."""
    images, captions = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not valid JSON ({err})") from err
        missing = [k for k in ("file_name", caption_key) if k not in row]
        if missing:
            raise ValueError(f"{path}, line {number}: missing keys {missing}; has {sorted(row)}")
        images.append(path.parent / row["file_name"])
        captions.append(str(row[caption_key]))
    repeated = sorted(str(p) for p, n in Counter(images).items() if n > 1)
    if repeated:
        raise ValueError(
            f"{path} names {len(repeated)} files more than once: {list_some(repeated)}; give each "
            "image one line (for more of an image, use ldm.data.mix.DataMix's repeats)"
        )
    absent = [str(p) for p in images if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{path} names {len(absent)} missing files: {list_some(absent)}")
    return images, captions


def file_identity(path: Path) -> str:
    """`path:size:mtime_ns`, which changes when the file is rewritten."""
    stat = os.stat(path)
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


class ImageCaptionFolder(Dataset):
    """Images under `root` (recursive) with `.txt` or `metadata.jsonl` captions, or one
    `caption` for all (a DreamBooth folder's instance or class prompt); items are
    `{"image": float32 (H, W, 3) in [-1, 1], "caption": str, "skipped": int,
    "empty_caption": 0 or 1}`, plus `"loss_mask"` (H, W, 1) in [0, 1] with `masks`.

    Without `buckets` every image is resized and cropped to `size`×`size`; with them (a
    `BucketSpec` mapping) to the bucket nearest its aspect ratio (`bucket_sizes`, one per item).
    An image smaller than its crop is upscaled with a warning, or with `small_images: skip`
    left out (both counted once, when the folder is read). `captions` are `CaptionOptions`.

    Unreadable images are skipped with a warning and replaced by the next readable item (cropped
    to the skipped one's size); their paths collect in `skipped_files` (per process: each
    DataLoader worker keeps its own set), and each item's `"skipped"` counts the files passed
    over to produce it, so that `ldm.callbacks.DataReport` can total them per epoch.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 256,
        crop: str = "center",
        flip_p: float = 0.0,
        caption_key: str = "text",
        caption: str | None = None,
        buckets: Mapping | None = None,
        captions: Mapping | None = None,
        masks: str | None = None,
        small_images: str = "upscale",
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageCaptionFolder: root {str(self.root)!r} is not a folder")
        check_options("ImageCaptionFolder", masks, small_images)
        self.transform = ImageTransform(size, crop, flip_p)
        self.spec, self.caption_options = BucketSpec.parse(buckets), CaptionOptions.parse(captions)
        self.masks, self.fixed_caption = masks, caption
        self.skipped_files: set[Path] = set()
        self.images, self.captions = self.list_images(caption_key)
        self.sizes = [self.read_size(path) for path in self.images]
        self.targets = [self.natural_target(size) for size in self.sizes]
        self.remap: dict[Size, Size] = {}
        self.handle_small_images(small_images)
        if masks == "file":
            self.check_masks()
        self.log_contents()

    def list_images(self, caption_key: str) -> tuple[list[Path], list[str] | None]:
        metadata = self.root / METADATA_FILE
        if self.fixed_caption is not None:
            images, captions = find_images(self.root), None
        elif metadata.is_file():
            images, captions = read_metadata(metadata, caption_key)
        else:
            images, captions = self.images_with_txt_captions(), None
        if not images:
            raise FileNotFoundError(
                f"ImageCaptionFolder: no images in {str(self.root)!r} "
                f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)} or a {METADATA_FILE})"
            )
        return images, captions

    def images_with_txt_captions(self) -> list[Path]:
        """Every image under root; each must have a sibling `name.txt`."""
        images = find_images(self.root)
        uncaptioned = [str(p) for p in images if not p.with_suffix(".txt").is_file()]
        if uncaptioned:
            raise FileNotFoundError(
                f"ImageCaptionFolder {str(self.root)!r}: {len(uncaptioned)} images have no "
                f"caption (expected a sibling .txt, a {METADATA_FILE} in the root, or "
                f"`caption:` for every image, e.g. a DreamBooth instance or class prompt): "
                f"{list_some(uncaptioned)}"
            )
        return images

    @staticmethod
    def read_size(path: Path) -> Size | None:
        """The image's shown (width, height), or None when its header is unreadable (the image
        is then skipped when loaded)."""
        try:
            return image_size(path)
        except IMAGE_ERRORS:
            return None

    def natural_target(self, size: Size | None) -> Size:
        """The crop an image of `size` gets: its nearest bucket, or the square."""
        square = (self.transform.size, self.transform.size)
        if self.spec is None:
            return square
        return self.spec.nearest(size or (1, 1))

    def handle_small_images(self, policy: str) -> None:
        """Upscale (with a warning) or leave out the images smaller than their crop."""
        small = [
            i
            for i, (size, target) in enumerate(zip(self.sizes, self.targets, strict=True))
            if size is not None and cover_scale(size, target) > 1
        ]
        if not small:
            return
        names = list_some([self.images[i].name for i in small])
        if policy == "upscale":
            logger.warning(
                "%s: %d images are smaller than their crop and are upscaled (blurrier than the "
                "rest; small_images: skip leaves them out): %s",
                self.root,
                len(small),
                names,
            )
            return
        keep = sorted(set(range(len(self.images))) - set(small))
        logger.warning(
            "%s: %d images smaller than their crop are left out (small_images: skip): %s",
            self.root,
            len(small),
            names,
        )
        if not keep:
            raise ValueError(f"ImageCaptionFolder {str(self.root)!r}: every image is too small")
        self.images = [self.images[i] for i in keep]
        self.captions = [self.captions[i] for i in keep] if self.captions is not None else None
        self.sizes = [self.sizes[i] for i in keep]
        self.targets = [self.targets[i] for i in keep]

    def check_masks(self) -> None:
        """Every `name.mask.png` has its image's size (images without one train unmasked)."""
        wrong = []
        for image, size in zip(self.images, self.sizes, strict=True):
            mask = mask_path(image)
            if mask.is_file() and size is not None and image_size(mask) != size:
                wrong.append(f"{mask.name} {image_size(mask)} vs {image.name} {size}")
        if wrong:
            raise ValueError(
                f"ImageCaptionFolder {str(self.root)!r}: {len(wrong)} masks differ in size "
                f"(width, height) from their image: {list_some(wrong)}"
            )

    def log_contents(self) -> None:
        source = METADATA_FILE if self.captions is not None else ".txt files"
        source = f"caption: {self.fixed_caption!r}" if self.fixed_caption is not None else source
        shapes = f", buckets {bucket_summary(self.targets)}" if self.spec is not None else ""
        logger.info("%s: %d images, captions from %s%s", self.root, len(self), source, shapes)

    @property
    def bucket_sizes(self) -> list[Size] | None:
        """Each item's crop (width, height) when bucketed (small buckets merged), else None."""
        return None if self.spec is None else [self.target(i) for i in range(len(self))]

    def merge_buckets(self, merged: Mapping[Size, Size]) -> None:
        """Crop the items of each bucket in `merged` to the bucket it maps to."""
        self.remap = dict(merged)

    @property
    def random_captions(self) -> bool:
        return self.caption_options.is_random

    @property
    def skipped(self) -> int:
        """How many distinct unreadable files this process has skipped."""
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int) -> str:
        """The caption of image `index`, as stored (before `captions` augment it)."""
        if self.fixed_caption is not None:
            return self.fixed_caption
        if self.captions is not None:
            return self.captions[index]
        return self.images[index].with_suffix(".txt").read_text(encoding="utf-8").strip()

    def item_identity(self, index: int) -> str:
        """What changes when item `index`'s files or caption do: size and mtime of the image,
        its .txt and its mask, and an in-memory caption's text (for the latent cache's key)."""
        image = self.images[index]
        files = (image, image.with_suffix(".txt"), mask_path(image))
        parts = [file_identity(path) for path in files if path.is_file()]
        return "|".join([*parts, self.caption(index) if self.captions is not None else ""])

    def target(self, index: int) -> Size:
        target = self.targets[index]
        return self.remap.get(target, target)

    def load(self, index: int, target: Size) -> dict[str, np.ndarray | str | int]:
        """Item `index` cropped to `target`, raising if its files cannot be read."""
        image, mask_file = open_image(self.images[index]), mask_path(self.images[index])
        mask = loss_mask(self.masks, image, mask_file if mask_file.is_file() else None)
        caption = self.caption_options(self.caption(index))
        return captioned(self.transform(image, target, mask), caption)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str | int]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images in {self.root}")
        target = self.target(index)
        for offset in range(n):
            i = (index + offset) % n
            if self.images[i] in self.skipped_files:
                continue
            try:
                return {**self.load(i, target), "skipped": offset}
            except IMAGE_ERRORS as err:
                self.skipped_files.add(self.images[i])
                logger.warning("skipping unreadable image %s: %s", self.images[i], err)
        raise RuntimeError(f"ImageCaptionFolder {str(self.root)!r}: all {n} images are unreadable")
