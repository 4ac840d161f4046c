"""An embedded, procedural captioned data set: one coloured shape on a coloured background.

Item `i` is a pure function of `(seed, i)`, so every worker and process draws the same item for
the same index and no files are needed. The labels travel with each item so that generated
images can be scored against the prompt ("a red circle on a blue background").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.data.folder import to_unit_range

# Well-separated hues (and white) that a simple nearest-colour judge tells apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (245, 215, 20),
    "purple": (150, 40, 190),
    "white": (245, 245, 245),
}
SUPERSAMPLE = 4  # draw at 4× and box-filter down: light anti-aliasing
CROSS_ARM = 0.3  # half-thickness of a cross's bars, as a fraction of its radius

Drawer = Callable[[ImageDraw.ImageDraw, float, float, float, tuple[int, int, int]], None]


def _circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _square(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)


def _triangle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)


def _cross(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    arm = r * CROSS_ARM
    draw.rectangle([cx - arm, cy - r, cx + arm, cy + r], fill=fill)
    draw.rectangle([cx - r, cy - arm, cx + r, cy + arm], fill=fill)


def _diamond(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, fill) -> None:
    draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)


# Each shape fills the square [cx - r, cx + r] × [cy - r, cy + r] and covers its centre.
SHAPES: dict[str, Drawer] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "cross": _cross,
    "diamond": _diamond,
}
# The data set's shapes unless `shapes` names others: "diamond" is kept out, a shape the
# demo's model never sees, for the DreamBooth demo to teach (scripts/demo_dreambooth.py).
DEFAULT_SHAPES = ("circle", "square", "triangle", "cross")


def caption_for(color: str, shape: str, background: str) -> str:
    """The caption of a `color` `shape` on a `background` background."""
    article = "an" if color[:1].lower() in "aeiou" else "a"
    return f"{article} {color} {shape} on a {background} background"


def draw_shape(
    shape: str,
    size: int | tuple[int, int],
    center: tuple[float, float],
    radius: float,
    color: Sequence[int],
    background: Sequence[int],
) -> np.ndarray:
    """uint8 (H, W, 3) image of `shape` at `center` (x, y in pixels) on `background`; `size`
    is W = H, or (W, H)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
    width, height = (size, size) if isinstance(size, int) else size
    big = (width * SUPERSAMPLE, height * SUPERSAMPLE)
    image = Image.new("RGB", big, tuple(int(v) for v in background))
    cx, cy, r = (v * SUPERSAMPLE for v in (center[0], center[1], radius))
    SHAPES[shape](ImageDraw.Draw(image), cx, cy, r, tuple(int(v) for v in color))
    return np.asarray(image.resize((width, height), Image.Resampling.BOX))


def parse_colors(
    colors: Mapping[str, Sequence[int]] | Sequence[str] | None,
) -> dict[str, tuple[int, int, int]]:
    """{name: RGB} from a mapping, a list of PALETTE names, or None (the whole PALETTE)."""
    if colors is None:
        return dict(PALETTE)
    if not isinstance(colors, Mapping):
        unknown = [c for c in colors if c not in PALETTE]
        if unknown:
            raise ValueError(f"param 'colors': unknown names {unknown}; known: {list(PALETTE)}")
        colors = {name: PALETTE[name] for name in colors}
    parsed = {str(k): tuple(int(c) for c in v) for k, v in colors.items()}
    bad = [k for k, v in parsed.items() if len(v) != 3 or not all(0 <= c <= 255 for c in v)]
    if bad:
        raise ValueError(f"param 'colors': {bad} are not RGB triples of ints in 0..255")
    if len(parsed) < 2:
        raise ValueError(f"param 'colors' needs at least 2 colours (shape ≠ background): {parsed}")
    return parsed


class SyntheticShapes(Dataset):
    """A `color` `shape` on a different `background` colour, `size` px; deterministic per index.

    Items: `{"image": float32 (size, size, 3) in [-1, 1], "caption": str, "color": int,
    "shape": int, "background": int}`, the ints indexing `color_names` / `shape_names`.
    Shapes keep a margin of `size // 16` px (at least 1) from the border, so the four corner
    pixels always show the background. With `sizes` ([[width, height], ...]) item i is drawn
    at sizes[i % len(sizes)] instead (the shape scaled to the shorter side), and the data set
    is bucketed by them (`bucket_sizes`), as aspect-ratio buckets batch images.
    """

    caption_for = staticmethod(caption_for)

    def __init__(
        self,
        size: int = 32,
        length: int = 10000,
        seed: int = 0,
        colors: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
        shapes: Sequence[str] | None = None,
        min_scale: float = 0.4,
        max_scale: float = 0.8,
        sizes: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if size < 8 or length < 1 or seed < 0:
            raise ValueError(
                f"SyntheticShapes: expected size ≥ 8, length ≥ 1, seed ≥ 0; "
                f"got {size}, {length}, {seed}"
            )
        self.size, self.length, self.seed = size, length, seed
        palette = parse_colors(colors)
        self.color_names = list(palette)
        self.color_values = np.array(list(palette.values()), dtype=np.uint8)  # (n_colors, 3)
        self.shape_names = list(DEFAULT_SHAPES if shapes is None else map(str, shapes))
        unknown = [s for s in self.shape_names if s not in SHAPES]
        if unknown or not self.shape_names:
            raise ValueError(f"param 'shapes': unknown {unknown}; choose from {list(SHAPES)}")
        self.margin = max(1, size // 16)
        largest = 1 - 2 * self.margin / size
        if not 0 < min_scale <= max_scale <= largest:
            raise ValueError(
                f"params 'min_scale' ({min_scale}) ≤ 'max_scale' ({max_scale}) must lie in "
                f"(0, {largest:.3f}] for size {size} (a {self.margin} px margin is kept)"
            )
        self.min_scale, self.max_scale = min_scale, max_scale
        self.sizes = None if sizes is None else [tuple(int(v) for v in wh) for wh in sizes]
        if self.sizes is not None and (
            not self.sizes or any(len(wh) != 2 or min(wh) < size for wh in self.sizes)
        ):
            raise ValueError(
                f"param 'sizes': expected [[width, height], ...] with sides ≥ size ({size}), "
                f"got {sizes!r}"
            )

        self.remap: dict[tuple[int, int], tuple[int, int]] = {}

    @property
    def bucket_sizes(self) -> list[tuple[int, int]] | None:
        """Each item's (width, height) with `sizes`; None (one size) otherwise."""
        return None if self.sizes is None else [self.item_size(i) for i in range(self.length)]

    def merge_buckets(self, merged: Mapping[tuple[int, int], tuple[int, int]]) -> None:
        """Draw the items of each size in `merged` at the size it maps to (a bucket too small
        for a batch, `ldm.data.buckets.merge_small_buckets`)."""
        self.remap = dict(merged)

    def item_size(self, index: int) -> tuple[int, int]:
        """(width, height) of item `index`."""
        if self.sizes is None:
            return self.size, self.size
        size = self.sizes[index % len(self.sizes)]
        return self.remap.get(size, size)

    def __len__(self) -> int:
        return self.length

    def caption(self, color: int, shape: int, background: int) -> str:
        """The caption for label indices."""
        names = self.color_names
        return caption_for(names[color], self.shape_names[shape], names[background])

    def sample_labels(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(color, shape, background) indices, background ≠ color."""
        n = len(self.color_names)
        color = int(rng.integers(n))
        background = (color + 1 + int(rng.integers(n - 1))) % n
        return color, int(rng.integers(len(self.shape_names))), background

    def render(
        self,
        color: int,
        shape: int,
        background: int,
        rng: np.random.Generator,
        size: tuple[int, int] | None = None,
    ) -> np.ndarray:
        """float32 (H, W, 3) in [-1, 1]: the given labels at an `rng`-drawn scale and place,
        at `size` (width, height; default size × size)."""
        width, height = size or (self.size, self.size)
        radius = rng.uniform(self.min_scale, self.max_scale) * min(width, height) / 2
        x = rng.uniform(self.margin + radius, width - self.margin - radius)
        y = rng.uniform(self.margin + radius, height - self.margin - radius)
        colors = self.color_values
        pixels = draw_shape(
            self.shape_names[shape], (width, height), (x, y), radius, colors[color],
            colors[background],
        )  # fmt: skip
        return to_unit_range(pixels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray | str | int]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for SyntheticShapes of {self.length}")
        rng = np.random.default_rng([self.seed, index])
        color, shape, background = self.sample_labels(rng)
        return {
            "image": self.render(color, shape, background, rng, self.item_size(index)),
            "caption": self.caption(color, shape, background),
            "color": color,
            "shape": shape,
            "background": background,
        }
