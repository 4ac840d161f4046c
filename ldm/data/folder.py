"""A folder of captioned images as a map-style data set, plus the image transform shared by all
file-backed data sets (resize the shorter side, square crop, optional flip, scale to [-1, 1]).

Captions come from a sibling `name.txt` per image, or from a `metadata.jsonl` in the root with
one `{"file_name": ..., "text": ...}` per line (the Hugging Face image-folder convention).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
METADATA_FILE = "metadata.jsonl"
CROPS = ("center", "random")
# What Pillow raises for truncated, corrupt or absurdly large files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
MAX_LISTED = 5  # file names quoted in an error message before "and N more"


def list_some(items: Sequence[object]) -> str:
    """The first few items of a list, and how many more there are."""
    shown = ", ".join(str(item) for item in items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return shown + (f" and {rest} more" if rest > 0 else "")


def open_rgb(source: str | Path | bytes) -> Image.Image:
    """Fully decode an image file (path or bytes) to RGB, honouring its EXIF orientation."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()  # decode now, so corrupt data fails here and not in a later resize
        return ImageOps.exif_transpose(image).convert("RGB")


def to_unit_range(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB image or array -> float32 array (H, W, 3) in [-1, 1]."""
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


class ImageTransform:
    """Resize the shorter side to `size`, crop `size`×`size`, maybe flip, scale to [-1, 1]."""

    def __init__(self, size: int, crop: str = "center", flip_p: float = 0.0) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"param 'size' must be a positive int (pixels), got {size!r}")
        if crop not in CROPS:
            raise ValueError(f"param 'crop' must be one of {CROPS}, got {crop!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"param 'flip_p' must be a probability in [0, 1], got {flip_p!r}")
        self.size, self.crop, self.flip_p = size, crop, flip_p

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> float32 array (size, size, 3) in [-1, 1]."""
        image = self.resize(image.convert("RGB"))
        image = image.crop(self.crop_box(*image.size))
        # np.random is seeded per item from (seed, epoch, index) for map-style data
        # (SeededItems), per DataLoader worker for streamed data
        if self.flip_p > 0 and np.random.random() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_unit_range(image)

    def resize(self, image: Image.Image) -> Image.Image:
        """Scale so that the shorter side is `size` (bicubic, antialiased when shrinking)."""
        width, height = image.size
        if min(width, height) == self.size:
            return image
        scale = self.size / min(width, height)
        new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
        return image.resize(new_size, Image.Resampling.BICUBIC)

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the square crop, centred or uniformly random."""
        if self.crop == "center":
            left, top = (width - self.size) // 2, (height - self.size) // 2
        else:
            left = np.random.randint(0, width - self.size + 1)
            top = np.random.randint(0, height - self.size + 1)
        return left, top, left + self.size, top + self.size


def find_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, in sorted order."""
    return sorted(
        p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
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
    absent = [str(p) for p in images if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"{path} names {len(absent)} missing files: {list_some(absent)}")
    return images, captions


class ImageCaptionFolder(Dataset):
    """Images under `root` (recursive) with `.txt` or `metadata.jsonl` captions, or one
    `caption` for all (a DreamBooth folder's instance or class prompt); items are
    `{"image": float32 (size, size, 3) in [-1, 1], "caption": str}`.

    Unreadable images are skipped with a warning and replaced by the next readable item; their
    paths collect in `skipped_files` (per process: each DataLoader worker keeps its own set),
    and each item's `"skipped"` counts the files passed over to produce it, so that
    `ldm.callbacks.SkippedImagesReport` can total them per epoch across workers.
    """

    def __init__(
        self,
        root: str | Path,
        size: int = 256,
        crop: str = "center",
        flip_p: float = 0.0,
        caption_key: str = "text",
        caption: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageCaptionFolder: root {str(self.root)!r} is not a folder")
        self.transform = ImageTransform(size, crop, flip_p)
        self.skipped_files: set[Path] = set()
        metadata = self.root / METADATA_FILE
        self.fixed_caption = caption
        if caption is not None:
            self.images, self.captions = find_images(self.root), None
        elif metadata.is_file():
            self.images, self.captions = read_metadata(metadata, caption_key)
        else:
            self.images, self.captions = self.images_with_txt_captions(), None
        if not self.images:
            raise FileNotFoundError(
                f"ImageCaptionFolder: no images in {str(self.root)!r} "
                f"(looked recursively for {', '.join(IMAGE_EXTENSIONS)} or a {METADATA_FILE})"
            )
        source = METADATA_FILE if self.captions is not None else ".txt files"
        source = f"caption: {caption!r}" if caption is not None else source
        logger.info("%s: %d images, captions from %s", self.root, len(self.images), source)

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

    @property
    def skipped(self) -> int:
        """How many distinct unreadable files this process has skipped."""
        return len(self.skipped_files)

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, index: int) -> str:
        """The caption of image `index`."""
        if self.fixed_caption is not None:
            return self.fixed_caption
        if self.captions is not None:
            return self.captions[index]
        return self.images[index].with_suffix(".txt").read_text(encoding="utf-8").strip()

    def load(self, index: int) -> dict[str, np.ndarray | str]:
        """Item `index`, raising if its files cannot be read."""
        image = self.transform(open_rgb(self.images[index]))
        return {"image": image, "caption": self.caption(index)}

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images in {self.root}")
        for offset in range(n):
            i = (index + offset) % n
            if self.images[i] in self.skipped_files:
                continue
            try:
                return {**self.load(i), "skipped": offset}
            except IMAGE_ERRORS as err:
                self.skipped_files.add(self.images[i])
                logger.warning("skipping unreadable image %s: %s", self.images[i], err)
        raise RuntimeError(f"ImageCaptionFolder {str(self.root)!r}: all {n} images are unreadable")
