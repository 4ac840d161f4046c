"""Line plots drawn with Pillow (no matplotlib): loss and accuracy curves against steps."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

Series = dict[str, tuple[Sequence[float], Sequence[float]]]

SIZE = (800, 480)  # the saved image, pixels
SUPERSAMPLE = 2  # drawn at this scale, then downsampled: smooth lines without anti-aliasing
MARGINS = (80, 44, 24, 56)  # left, top, right, bottom, pixels of SIZE
FONT_SIZE, TITLE_SIZE = 13, 16
COLORS = [(31, 119, 180), (230, 110, 0), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
GRID, AXIS, TEXT = (225, 225, 225), (60, 60, 60), (20, 20, 20)
LOG_RATIO = 10.0  # auto log-y when the positive values span at least this factor
MAX_MARKERS = 60  # series with at most this many points also get a dot per point
TICKS = 6  # about this many ticks per axis


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's built-in font at `size` pixels (older Pillow: its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size * SUPERSAMPLE)
    except TypeError:
        return ImageFont.load_default()


def finite_points(steps: Sequence[float], values: Sequence[float], log_y: bool) -> list:
    """(step, value) pairs with both finite (and the value > 0 on a log axis)."""
    pairs = [(float(s), float(v)) for s, v in zip(steps, values, strict=True)]
    return [
        (s, v) for s, v in pairs if math.isfinite(s) and math.isfinite(v) and (v > 0 or not log_y)
    ]


def wants_log(series: Series) -> bool:
    """Log-y when every finite value is positive and they span at least LOG_RATIO."""
    values = [v for _, v in (p for s in series.values() for p in finite_points(*s, False))]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= LOG_RATIO


def nice_step(span: float, n: int = TICKS) -> float:
    """A tick spacing of 1, 2 or 5 × 10^k giving about `n` ticks over `span`."""
    base = 10 ** math.floor(math.log10(span / max(n, 1)))
    return min((m * base for m in (1, 2, 5, 10)), key=lambda step: abs(span / step - n))


def linear_ticks(lo: float, hi: float) -> list[float]:
    """Round tick values inside [lo, hi]."""
    step = nice_step(hi - lo)
    first = math.ceil(lo / step - 1e-9)
    return [round(k * step, 12) for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Decades inside [lo, hi] (log10 units), with 2 and 5 between them on short ranges."""
    mantissas = (1,) if hi - lo > 2 else (1, 2, 5)
    decades = range(math.floor(lo), math.ceil(hi) + 1)
    ticks = [math.log10(m * 10.0**d) for d in decades for m in mantissas]
    inside = [t for t in ticks if lo - 1e-9 <= t <= hi + 1e-9]
    return inside if len(inside) >= 2 else linear_ticks(lo, hi)


def tick_label(value: float) -> str:
    """Short numbers: 1500, 12k, 0.25, 1e-04."""
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.0e}"
    if abs(value) >= 1e4 and value % 1000 == 0:
        return f"{value / 1000:g}k"
    return f"{value:.4g}"


def padded(lo: float, hi: float, pad: float = 0.05) -> tuple[float, float]:
    """[lo, hi] widened by `pad` of its span on each side, or by 0.5 when it is empty."""
    if hi - lo <= 0:
        return lo - 0.5, hi + 0.5
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def data_ranges(points: dict[str, list], log_y: bool, y_range) -> tuple[tuple, tuple]:
    """((x lo, x hi), (y lo, y hi)) of the points, y in log10 units on a log axis."""
    xs = [s for pts in points.values() for s, _ in pts] or [0.0, 1.0]
    ys = [math.log10(v) if log_y else v for pts in points.values() for _, v in pts] or [0.0, 1.0]
    x_range = padded(min(0.0, *xs), max(xs), pad=0.02)  # steps: the axis starts at 0
    if y_range is not None:
        lo, hi = (math.log10(y) for y in y_range) if log_y else y_range
        return x_range, padded(lo, hi, pad=0.02)  # points on a limit stay off the frame
    return x_range, padded(min(ys), max(ys))


class Canvas:
    """Maps data to pixels of the plot area and draws on the supersampled image."""

    def __init__(self, x_range: tuple, y_range: tuple, log_y: bool, names: list[str]):
        self.image = Image.new("RGB", (SIZE[0] * SUPERSAMPLE, SIZE[1] * SUPERSAMPLE), "white")
        self.draw = ImageDraw.Draw(self.image)
        self.font, self.title_font = font(FONT_SIZE), font(TITLE_SIZE)
        self.names = names
        left, top, right, bottom = (m * SUPERSAMPLE for m in MARGINS)
        right += self.legend_width()  # the legend sits right of the plot, never over a curve
        self.box = (left, top, self.image.width - right, self.image.height - bottom)
        self.x_range, self.y_range, self.log_y = x_range, y_range, log_y

    def legend_width(self) -> float:
        """Pixels the legend takes right of the plot: swatch, gap and the longest name."""
        if not self.names:
            return 0
        longest = max(self.draw.textlength(n, font=self.font) for n in self.names)
        return longest + 40 * SUPERSAMPLE

    def xy(self, step: float, value: float) -> tuple[float, float]:
        """Pixel of a data point (value in data units, not log10)."""
        (x0, x1), (y0, y1), (left, top, right, bottom) = self.x_range, self.y_range, self.box
        y = math.log10(value) if self.log_y else value
        return (
            left + (step - x0) / (x1 - x0) * (right - left),
            bottom - (y - y0) / (y1 - y0) * (bottom - top),
        )

    def text(self, xy: tuple, text: str, anchor: str, big: bool = False) -> None:
        face = self.title_font if big else self.font
        self.draw.text(xy, text, fill=TEXT, font=face, anchor=anchor)

    def axes(self, xlabel: str, ylabel: str, title: str) -> None:
        """Grid, ticks with numbers, the frame, axis labels and the title."""
        left, top, right, bottom = self.box
        s = SUPERSAMPLE
        for x in linear_ticks(*self.x_range):
            px = self.xy(x, 1.0)[0]
            self.draw.line([(px, top), (px, bottom)], fill=GRID, width=s)
            self.draw.line([(px, bottom), (px, bottom + 5 * s)], fill=AXIS, width=s)
            self.text((px, bottom + 7 * s), tick_label(x), "mt")
        y_ticks = (log_ticks if self.log_y else linear_ticks)(*self.y_range)
        for y in y_ticks:
            value = 10**y if self.log_y else y
            py = self.xy(self.x_range[0], value)[1]
            self.draw.line([(left, py), (right, py)], fill=GRID, width=s)
            self.draw.line([(left - 5 * s, py), (left, py)], fill=AXIS, width=s)
            self.text((left - 7 * s, py), tick_label(value), "rm")
        self.draw.rectangle(self.box, outline=AXIS, width=s)
        self.text(((left + right) / 2, self.image.height - 6 * s), xlabel, "ms")
        self.text(((left + right) / 2, top / 2), title, "mm", big=True)
        self.vertical_label(ylabel + (" (log scale)" if self.log_y else ""))

    def vertical_label(self, label: str) -> None:
        """The y-axis label, rotated, centred on the left margin's outer part."""
        if not label:
            return
        width = int(self.draw.textlength(label, font=self.font)) + 4
        strip = Image.new("RGB", (width, FONT_SIZE * SUPERSAMPLE * 2), "white")
        ImageDraw.Draw(strip).text(
            (2, strip.height / 2), label, fill=TEXT, font=self.font, anchor="lm"
        )
        strip = strip.rotate(90, expand=True)
        top, bottom = self.box[1], self.box[3]
        self.image.paste(strip, (2 * SUPERSAMPLE, int((top + bottom - strip.height) / 2)))

    def curve(self, points: list, color: tuple) -> None:
        """A polyline through the points, with dots where they are few."""
        pixels = [self.xy(s, v) for s, v in points]
        if len(pixels) > 1:
            self.draw.line(pixels, fill=color, width=2 * SUPERSAMPLE, joint="curve")
        if len(pixels) <= MAX_MARKERS:
            r = 3 * SUPERSAMPLE
            for x, y in pixels:
                self.draw.ellipse([(x - r, y - r), (x + r, y + r)], fill=color)

    def legend(self) -> None:
        """Colour swatches and series names, top to bottom, right of the plot area."""
        s, line = SUPERSAMPLE, (FONT_SIZE + 8) * SUPERSAMPLE
        left = self.box[2] + 14 * s
        for i, name in enumerate(self.names):
            y = self.box[1] + line * i + line / 2
            color = COLORS[i % len(COLORS)]
            self.draw.line([(left, y), (left + 18 * s, y)], fill=color, width=3 * s)
            self.text((left + 24 * s, y), name, "lm")


def line_plot(
    series: Series,
    path: str | os.PathLike,
    title: str = "",
    xlabel: str = "step",
    ylabel: str = "",
    log_y: bool | None = None,
    y_range: tuple[float, float] | None = None,
) -> None:
    """Draw each `{name: (steps, values)}` as a coloured line (dots where points are few) with
    axes, numbered ticks and a legend, and save a PNG at `path`.

    Non-finite points are left out (and non-positive ones on a log axis); a series with none
    left is still named in the legend. Args:
        log_y: log-scale y; None: without a y_range, when all values are positive and span a
            factor ≥ LOG_RATIO.
        y_range: fixed (lo, hi) of the y axis (e.g. (0, 1) for accuracies); None: the data's.
    """
    if log_y is None:
        log_y = y_range is None and wants_log(series)
    if log_y and y_range is not None and min(y_range) <= 0:
        raise ValueError(f"line_plot: y_range {y_range} must be positive on a log axis")
    points = {name: finite_points(*xy, log_y) for name, xy in series.items()}
    canvas = Canvas(*data_ranges(points, log_y, y_range), log_y, list(series))
    canvas.axes(xlabel, ylabel, title)
    for i, pts in enumerate(points.values()):
        canvas.curve(pts, COLORS[i % len(COLORS)])
    canvas.legend()
    canvas.image.resize(SIZE, Image.Resampling.LANCZOS).save(path)
