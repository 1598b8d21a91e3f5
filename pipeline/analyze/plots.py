"""Shared plotting helpers for the analyses: matplotlib, headless (Agg), every figure written
atomically with the numbers it shows beside it (`fig.png` + `fig.json`, and `fig.csv` for
tables), so a figure can be redrawn or checked without rerunning the analysis."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpseg.errors import UserError
from dpseg.io import atomic_write_bytes, atomic_write_json

PALETTE = {"image": "#444444", "text": "#1f77b4", "visual": "#d62728", "dual": "#2ca02c"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed, whatever the environment says)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def check_output(path: str | Path, suffixes: Sequence[str] = (".png",)) -> Path:
    """An output path with a known image suffix whose folder can be made; one-line error otherwise."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"output {path} must end in {' or '.join(suffixes)} (the figure's format)")
    if path.exists() and path.is_dir():
        raise UserError(f"output {path} is a folder; give a file name such as {path / ('figure' + suffixes[0])}")
    return path


def save_figure(fig, path: str | Path, data: dict[str, Any], dpi: int = 120) -> dict[str, str]:
    """Writes the figure (PNG) and its data (JSON beside it, same stem); returns both paths.
    Both writes are atomic; the figure is closed."""
    plt = pyplot()
    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    data_path = path.with_suffix(".json")
    atomic_write_json(data_path, to_jsonable(data))
    atomic_write_bytes(path, buffer.getvalue())
    return {"figure": str(path), "data": str(data_path)}


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> str:
    """Rows of dicts -> CSV (columns in first-seen order), atomically."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, buffer.getvalue().encode())
    return str(path)


def to_jsonable(value: Any) -> Any:
    """numpy / torch values -> plain JSON (NaN -> None)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, Path):
        return str(value)
    return value


def histogram_figure(series: dict[str, np.ndarray], bins: np.ndarray, title: str, xlabel: str):
    """Overlaid histograms, one per named series (Fig. 2 form)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, values in series.items():
        ax.hist(
            values,
            bins=bins,
            alpha=0.55,
            label=f"{name} (mean {np.mean(values):.3f})",
            color=PALETTE.get(name),
            edgecolor="white",
            linewidth=0.4,
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(frameon=False)
    return fig


def scatter_figure(points: dict[str, np.ndarray], centroids: dict[str, np.ndarray], title: str, axis_labels=("1", "2")):
    """2-D points per named group, with each group's centroid as a large marker (Fig. 1 form)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    for name, xy in points.items():
        ax.scatter(xy[:, 0], xy[:, 1], s=12, alpha=0.6, color=PALETTE.get(name), label=name)
    for name, c in centroids.items():
        ax.scatter([c[0]], [c[1]], s=160, marker="*", color=PALETTE.get(name), edgecolor="black", linewidth=0.8)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    ax.legend(loc="best", framealpha=0.85, markerscale=1.5)
    return fig


def heatmap_grid(
    image: np.ndarray, rows: list[str], columns: list[str], maps: np.ndarray, title: str, shared_row_scale: bool = True
):
    """A grid: first column the image, then one heatmap per (row, column); maps (R, C, H, W).
    With `shared_row_scale` all heatmaps of a row share a colour range, so columns compare."""
    plt = pyplot()
    r, c = maps.shape[:2]
    fig, axes = plt.subplots(r, c + 1, figsize=(2.6 * (c + 1), 2.5 * r), squeeze=False)
    for i in range(r):
        axes[i, 0].imshow(image)
        axes[i, 0].set_ylabel(rows[i], fontsize=9)
        lo, hi = (float(maps[i].min()), float(maps[i].max())) if shared_row_scale else (None, None)
        for j in range(c):
            shown = axes[i, j + 1].imshow(maps[i, j], cmap="jet", vmin=lo, vmax=hi)
            if i == 0:
                axes[i, j + 1].set_title(columns[j], fontsize=10)
            if not shared_row_scale:
                fig.colorbar(shown, ax=axes[i, j + 1], fraction=0.046, pad=0.02)
        if shared_row_scale:  # one scale for the row: one bar beside it, every panel the same size
            fig.colorbar(shown, ax=list(axes[i, 1:]), fraction=0.02, pad=0.01)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title, fontsize=11)
    return fig
