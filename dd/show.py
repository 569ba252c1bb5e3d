"""Shaping what a report shows: rounded narrow tables, axis scales that fit the data, sample mosaics.

Nothing here computes a figure of merit; it only chooses how the notebooks display the values they computed.
Sample mosaics are drawn pixel for pixel (an integer number of screen pixels per image pixel, no resampling) and
stored as 256-colour PNGs (grey images need no more), so an executed report stays small and its images sharp, and
`reports/samples.png` reads well at a README's width.

    show.table(frame, ["steps", "fid_fmnist", "recall"])       # rounded, at most ~8 columns
    ax.set(yscale=show.scale(hist["loss"]))                      # log only where the values span > 10x
    show.mosaic({"teacher": x, "dd1 1-step": y}, labels, 10, 4)  # classes down, methods across (an image)

References:
    matplotlib (Figure.add_axes in figure fractions, imshow with interpolation="nearest").
"""
from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.scale import LogScale
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from . import data, io

GAP = 8  # white pixels between panels of a mosaic
DPI = 100
FAMILY_NAMES = {"llamagen": "LlamaGen", "var": "VAR", "t2i": "LlamaGen T2I"}  # as the papers write them


def scale(*values, base: int = 10):
    """The axis scale for these values, for `ax.set(yscale=...)` / `ax.set_xscale(...)`: "linear", unless the
    positive values span more than a factor of 10 (narrow ranges read better on a linear axis), then a log scale
    whose ticks are plain numbers that do not collide (1, 2, 5 per decade over at most two decades)."""
    v = np.concatenate([np.asarray(x, dtype=float).ravel() for x in values])
    v = v[np.isfinite(v)]
    if len(v) == 0 or (v <= 0).any() or v.max() / v.min() <= 10:
        return "linear"
    return PlainLogScale(base, subs=(1.0, 2.0, 5.0) if base == 10 and v.max() / v.min() <= 100 else (1.0,))


def _plain(v, _pos) -> str:
    return f"{v:g}"


class PlainLogScale(LogScale):
    """matplotlib's log scale with plain-number major ticks at `subs` of each power of `base`, minor ticks
    unlabelled (the default labels minor ticks on short ranges, and they collide)."""

    def __init__(self, base: int = 10, subs=(1.0,)):
        super().__init__(None, base=base)
        self.tick_subs = subs

    def set_default_locators_and_formatters(self, axis):
        super().set_default_locators_and_formatters(axis)
        axis.set_major_locator(LogLocator(self.base, subs=self.tick_subs))
        axis.set_major_formatter(FuncFormatter(_plain))
        axis.set_minor_formatter(NullFormatter())


def table(frame: pd.DataFrame, columns: list[str] | None = None, digits: int = 3) -> pd.DataFrame:
    """`frame`'s `columns` (default: all), numbers rounded to `digits` decimals, for display."""
    out = (frame if columns is None else frame[[c for c in columns if c in frame.columns]]).copy()
    for c in out.columns:  # counts stored as floats read as counts
        v = out[c]
        if v.dtype.kind == "f" and v.notna().all() and (v == v.round()).all() and (v.abs() < 2 ** 53).all():
            out[c] = v.astype("int64")
    return out.round(digits)


def summary(values: dict, digits: int = 4) -> pd.DataFrame:
    """A {name: value} mapping as a one-column table, for a stage's headline figures; floats keep `digits`
    significant digits (the rows mix seconds, shares and counts, so no one number of decimals fits)."""
    shown = {k: (float(f"{float(v):.{digits}g}") if isinstance(v, (float, np.floating)) else v) for k, v in values.items()}
    return pd.DataFrame({"value": pd.Series(shown, dtype=object)})


def _tiles(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int) -> list[list[torch.Tensor]]:
    """Per class, its first `per_class` images as uint8 RGB [3, H, W] (blank where a class has fewer)."""
    x = data.to_channels(images if images.dtype == torch.uint8 else data.to_uint8(images), 3).cpu()
    labels = labels.cpu()[: len(x)]
    blank = torch.full_like(x[0], 255)
    rows = []
    for c in range(num_classes):
        mine = list(x[labels == c][:per_class])
        rows.append(mine + [blank] * (per_class - len(mine)))
    return rows


def _canvas(blocks: list[list[list[torch.Tensor]]], across: bool) -> tuple[np.ndarray, list[float]]:
    """Blocks of tile rows joined with white gaps, side by side (across) or stacked → (uint8 [H, W, 3], the
    centre of each block in pixels along the joining axis)."""
    grids = [data.grid(torch.stack([t for row in rows for t in row]), nrow=len(rows[0])) for rows in blocks]
    axis = 1 if across else 0
    parts, centres, at = [], [], 0
    for i, g in enumerate(grids):
        if i:
            shape = list(g.shape)
            shape[axis] = GAP
            parts.append(np.full(shape, 255, dtype=np.uint8))
            at += GAP
        parts.append(g)
        centres.append(at + g.shape[axis] / 2)
        at += g.shape[axis]
    return np.concatenate(parts, axis=axis), centres


def _figure(canvas: np.ndarray, zoom: int, left_in: float, top_in: float):
    """A figure that shows `canvas` at `zoom` screen pixels per pixel, with margins for labels (inches)."""
    import matplotlib.pyplot as plt

    h, w = canvas.shape[0] * zoom / DPI, canvas.shape[1] * zoom / DPI
    fig = plt.figure(figsize=(w + left_in + 0.1, h + top_in + 0.1), dpi=DPI)
    W, H = fig.get_size_inches()
    ax = fig.add_axes([left_in / W, 0.1 / H, w / W, h / H])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_frame_on(False)
    ax.tick_params(length=0)
    return fig, ax


def zoom_for(width_px: int, target: int = 960) -> int:
    """The larger integer zoom (1 or 2) that keeps `width_px` within about `target` screen pixels."""
    return int(max(1, min(2, target // max(width_px, 1))))


def mosaic(images: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, per_class: int,
           classes: list[str] | None = None, title: str | None = None, zoom: int | None = None):
    """Methods side by side, one row of `per_class` samples per class (the same labels in every panel).

    images: {name: [N, C, H, W]} (uint8 or [-1, 1] float); labels: [N] shared by all (a shorter set uses the
    first labels), or {name: [N]}. → an IPython image (a notebook shows it)."""
    return compact(mosaic_figure(images, labels, num_classes, per_class, classes, title, zoom))


def mosaic_figure(images: dict[str, torch.Tensor], labels: torch.Tensor, num_classes: int, per_class: int,
                  classes: list[str] | None = None, title: str | None = None, zoom: int | None = None):
    """`mosaic` as a matplotlib Figure."""
    blocks = [_tiles(x, labels[k] if isinstance(labels, dict) else labels, num_classes, per_class)
              for k, x in images.items()]
    canvas, centres = _canvas(blocks, across=True)
    zoom = zoom or zoom_for(canvas.shape[1])
    fig, ax = _figure(canvas, zoom, left_in=1.0 if classes else 0.1, top_in=0.5 if title else 0.3)
    ax.xaxis.tick_top()
    ax.set_xticks(centres, list(images) if len(images) > 1 else [""] * len(images), fontsize=9)
    side = canvas.shape[0] / num_classes
    if classes:
        ax.set_yticks([side * (c + 0.5) for c in range(num_classes)], classes, fontsize=8)
    else:
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.05 / fig.get_size_inches()[1])
    return fig


def sheet(grids: dict[str, dict[str, torch.Tensor]], labels: dict[str, torch.Tensor], methods: tuple[str, ...],
          num_classes: int, per_class: int, classes: list[str] | None = None, zoom: int = 2):
    """The README's picture: per family a block of rows (`methods`, those it has), each row `per_class` samples of
    every class in class order, so a column holds one label throughout.

    grids: {family: {method: images [N, C, H, W]}}; labels: {family: [N]}. → the matplotlib Figure."""
    parts, names, centres, at = [], [], [], 0
    for family, images in grids.items():
        for j, method in enumerate(m for m in methods if m in images):
            tiles = [t for row in _tiles(images[method], labels[family], num_classes, per_class) for t in row]
            g = data.grid(torch.stack(tiles), nrow=len(tiles))
            if parts and j == 0:  # a wider gap between families
                parts.append(np.full((2 * GAP, g.shape[1], 3), 255, dtype=np.uint8))
                at += 2 * GAP
            parts.append(g)
            names.append(f"{FAMILY_NAMES.get(family, family)} · {method.replace('dd', 'DD')}")
            centres.append(at + g.shape[0] / 2)
            at += g.shape[0]
    canvas = np.concatenate(parts, axis=0)
    fig, ax = _figure(canvas, zoom, left_in=1.9, top_in=0.35 if classes else 0.1)
    ax.set_yticks(centres, names, fontsize=10)
    width = canvas.shape[1] / num_classes
    if classes:
        ax.xaxis.tick_top()
        ax.set_xticks([width * (c + 0.5) for c in range(num_classes)], classes, fontsize=8)
    else:
        ax.set_xticks([])
    return fig


def png(fig, dpi: int = DPI, colors: int = 256) -> bytes:
    """A figure as a palette PNG of at most `colors` colours (no dithering: flat areas stay flat)."""
    from PIL import Image

    raw = BytesIO()
    fig.savefig(raw, dpi=dpi, format="png")
    out = BytesIO()
    Image.open(raw).convert("RGB").quantize(colors, dither=Image.Dither.NONE).save(out, format="PNG", optimize=True)
    return out.getvalue()


def compact(fig):
    """A figure for display as a palette PNG (a third of the bytes of matplotlib's RGBA one); closes the figure
    so the notebook does not show it a second time."""
    import matplotlib.pyplot as plt
    from IPython.display import Image

    data = png(fig)
    plt.close(fig)
    return Image(data=data, format="png")


def save(fig, dest: str | Path, dpi: int = DPI) -> Path:
    """Write a figure as a palette PNG, atomically (a reader never sees half a file)."""
    dest = io.path(dest)
    with io.atomic_path(dest) as tmp:
        tmp.write_bytes(png(fig, dpi))
    return dest
