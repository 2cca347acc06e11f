"""Drawing for ``pcpt-finetune visualize``: matplotlib figures (Agg canvas, no pyplot state) saved as PNG.

Each ``*_figure`` function takes prepared data (``finetune.visualize_recon``, ``finetune.visualize_data``)
and returns a figure; :func:`save_png` writes it atomically (a temporary file, then a rename).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from datapipes.errors import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from finetune.visualize_data import ResultRow, Series

__all__ = [
    "VIEW",
    "curves_figure",
    "embedding_figure",
    "new_figure",
    "reconstruction_figure",
    "results_figure",
    "save_png",
]

#: the fixed 3-D view (elevation, azimuth) in degrees, z up.
VIEW = (20.0, -60.0)
_VISIBLE, _PREDICTED, _TRUTH = "tab:blue", "tab:red", "0.35"


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches on an Agg canvas.

    Raises:
        UserError: matplotlib is not installed.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise UserError("pcpt-finetune visualize needs matplotlib: pip install matplotlib") from err
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, out: str | Path, *, dpi: int = 100) -> Path:
    """Writes ``fig`` to ``out`` (a ``.png`` path) atomically; returns the path.

    Raises:
        UserError: ``out`` does not end in ``.png`` or is a directory.
    """
    dest = Path(out)
    if dest.suffix.lower() != ".png":
        raise UserError(f"{dest}: --out must name a .png file")
    if dest.is_dir():
        raise UserError(f"{dest}: is a directory; --out takes a file name such as figure.png")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.stem}.tmp-{uuid.uuid4().hex[:8]}.png"
    try:
        fig.savefig(tmp, format="png", dpi=dpi)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _scatter3d(ax: Any, points: np.ndarray, color: str, size: float, label: str | None = None) -> None:
    if len(points):
        ax.scatter(points[:, 0], points[:, 1], points[:, 2], s=size, c=color, depthshade=False, label=label)


def _frame3d(ax: Any, limit: float) -> None:
    ax.view_init(elev=VIEW[0], azim=VIEW[1])
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_zlim(-limit, limit)
    ax.set_box_aspect((1, 1, 1), zoom=1.35)
    ax.set_axis_off()


def reconstruction_figure(
    panels: Sequence[Mapping[str, np.ndarray]],
    row_titles: Sequence[str],
    title: str,
    *,
    point_size: float = 2.0,
) -> Figure:
    """Masked input, reconstruction and ground truth side by side, one row per cloud (3-D, fixed view).

    Args:
        panels: per cloud, the point sets of ``finetune.visualize_recon.sample_panels``.
        row_titles: a label per cloud (e.g. its key and class).
        title: the figure title.
        point_size: marker size.
    """
    fig = new_figure(9.0, 3.0 * len(panels) + 0.4)
    fig.suptitle(title, fontsize=10)
    for row, (sets, name) in enumerate(zip(panels, row_titles)):
        limit = float(np.abs(sets["ground_truth"]).max()) * 1.05 or 1.0
        columns = (
            ("masked input (visible patches)", [(sets["visible"], _VISIBLE)]),
            (
                "reconstruction (red: predicted)",
                [(sets["visible"], _VISIBLE), (sets["predicted"], _PREDICTED)],
            ),
            ("ground truth", [(sets["ground_truth"], _TRUTH)]),
        )
        for col, (heading, layers) in enumerate(columns):
            ax = fig.add_subplot(len(panels), 3, 3 * row + col + 1, projection="3d")
            for points, color in layers:
                _scatter3d(ax, points, color, point_size)
            _frame3d(ax, limit)
            ax.set_title(f"{name}\n{heading}" if col == 0 else heading, fontsize=8)
    return fig


def _class_colors(count: int) -> list[Any]:
    from matplotlib import colormaps

    palette: list[Any] = []
    for name in ("tab20", "tab20b", "tab20c"):
        palette.extend(colormaps[name](np.arange(20)))
    if count <= len(palette):
        return palette[:count]
    return list(colormaps["hsv"](np.linspace(0.0, 1.0, count, endpoint=False)))


def embedding_figure(
    coords: np.ndarray, labels: np.ndarray, class_names: Sequence[str], title: str
) -> Figure:
    """A 2-D scatter of embedded clouds coloured by class, with a legend.

    Args:
        coords: (S, 2) coordinates.
        labels: (S,) class indices into ``class_names``.
        class_names: names of the classes.
        title: the figure title.
    """
    present = sorted(int(c) for c in np.unique(labels))
    colors = _class_colors(len(present))
    columns = 1 if len(present) <= 20 else 2
    fig = new_figure(7.0 + 1.6 * columns, 6.5)
    ax = fig.add_subplot(1, 1, 1)
    size = 6.0 if len(labels) > 1000 else 14.0
    for color, cls in zip(colors, present):
        keep = labels == cls
        name = class_names[cls] if 0 <= cls < len(class_names) else str(cls)
        ax.scatter(coords[keep, 0], coords[keep, 1], s=size, color=color, label=name, linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(
        loc="center left",
        bbox_to_anchor=(1.01, 0.5),
        fontsize=7,
        ncol=columns,
        markerscale=1.5,
        frameon=False,
    )
    return fig


def curves_figure(sources: Mapping[str, Mapping[str, Series]], title: str, *, columns: int = 3) -> Figure:
    """One panel per metric, one line per log source (e.g. ``version_0/metrics.csv``), x = step.

    Args:
        sources: source label -> metric -> (steps, values).
        title: the figure title.
        columns: panels per row.
    """
    metrics = sorted({m for series in sources.values() for m in series})
    rows = max(1, -(-len(metrics) // columns))
    cols = min(columns, max(1, len(metrics)))
    fig = new_figure(4.0 * cols, 2.8 * rows + 0.4)
    fig.suptitle(title, fontsize=10)
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, series in sources.items():
            if metric in series:
                steps, values = series[metric]
                ax.plot(steps, values, marker="." if len(steps) < 30 else None, linewidth=1.2, label=label)
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(sources) > 1:
            ax.legend(fontsize=6)
    return fig


def results_figure(groups: Mapping[str, Sequence[ResultRow]], title: str) -> Figure:
    """One bar chart per protocol/setting: accuracy (%) per model, error bars = std over folds.

    Args:
        groups: panel title -> rows (``finetune.visualize_data.group_results``).
        title: the figure title.
    """
    panels = list(groups.items())
    fig = new_figure(max(4.5, 4.5 * min(len(panels), 3)), 4.2 * (-(-len(panels) // 3)) + 0.4)
    fig.suptitle(title, fontsize=10)
    cols = min(len(panels), 3)
    rows = -(-len(panels) // 3)
    colors = _class_colors(max(len(r) for _, r in panels))
    for i, (panel, members) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        x = np.arange(len(members))
        means = [r.mean for r in members]
        bars = ax.bar(x, means, color=colors[: len(members)], edgecolor="0.2")
        folded = [i for i, r in enumerate(members) if r.folds > 1]  # single-pass probes have no error bar
        if folded:
            ax.errorbar(
                x[folded],
                [means[i] for i in folded],
                yerr=[members[i].std for i in folded],
                fmt="none",
                ecolor="black",
                capsize=4,
            )
        for bar, row in zip(bars, members):
            text = f"{row.mean:.1f}" + (f"\n±{row.std:.1f}" if row.folds > 1 else "")
            ax.text(bar.get_x() + bar.get_width() / 2, 1.0, text, ha="center", va="bottom", fontsize=7)
        folds = {r.folds for r in members}
        note = (
            f" (± std over {folds.pop()} folds)"
            if len(folds) == 1 and max(r.folds for r in members) > 1
            else ""
        )
        ax.set_title(panel + note, fontsize=9)
        ax.set_xticks(x, [r.label for r in members], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("accuracy (%)", fontsize=8)
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
    return fig
