"""Pictures of predictions: a fixed class palette and panels with a legend (matplotlib, headless)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dpseg.io import atomic_write_bytes


def palette(num_classes: int) -> np.ndarray:
    """(N, 3) uint8 colours, the same for a class id in every picture (golden-ratio hues)."""
    import colorsys

    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    rows = [
        colorsys.hsv_to_rgb(h, 0.65 + 0.35 * ((i // 7) % 2), 0.95 - 0.3 * ((i // 3) % 2)) for i, h in enumerate(hues)
    ]
    return (np.array(rows).reshape(-1, 3) * 255).astype(np.uint8)


def colourise(label: np.ndarray, colours: np.ndarray, ignore_colour=(0, 0, 0)) -> np.ndarray:
    """Label ids (H, W) -> RGB; ids outside the palette (ignore) get `ignore_colour`."""
    out = np.empty((*label.shape, 3), np.uint8)
    out[:] = ignore_colour
    valid = (label >= 0) & (label < len(colours))
    out[valid] = colours[label[valid]]
    return out


def blend(image: np.ndarray, label: np.ndarray, colours: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    colour = colourise(label, colours).astype(np.float32)
    valid = ((label >= 0) & (label < len(colours)))[..., None]
    mixed = np.where(valid, (1 - alpha) * image.astype(np.float32) + alpha * colour, image.astype(np.float32))
    return mixed.clip(0, 255).astype(np.uint8)


def save_panels(
    path: str | Path, tiles: list[tuple[str, np.ndarray]], legend: list[tuple[str, np.ndarray]], dpi: int = 100
) -> Path:
    """One row of titled RGB tiles and a legend of (name, colour) underneath, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    cols = len(tiles)
    fig, axes = plt.subplots(1, cols, figsize=(3.0 * cols, 3.6 + 0.22 * ((len(legend) + 3) // 4)), squeeze=False)
    for ax, (title, tile) in zip(axes[0], tiles, strict=True):
        ax.imshow(tile)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    if legend:
        handles = [Patch(facecolor=np.asarray(c) / 255, edgecolor="none", label=n[:28]) for n, c in legend]
        fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.05 * ((len(legend) + 3) // 4), 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue(), sync=False)
    return Path(path)


def legend_for(maps: list[np.ndarray], names: list[str], colours: np.ndarray) -> list[tuple[str, np.ndarray]]:
    present = sorted({int(v) for m in maps for v in np.unique(m) if 0 <= v < len(names)})
    return [(names[i], colours[i]) for i in present]
