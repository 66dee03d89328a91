"""Training curves as PNG files (matplotlib's Agg canvas: no display, no pyplot global state)."""

from __future__ import annotations

from pathlib import Path


def plot_loss_curve(history: list[dict], path: str, title: str = "loss", keys: tuple[str, ...] = ("train_loss", "eval_loss")) -> str:
    """Plot ``keys`` (train_loss, and eval_loss where present) against ``step``; write a PNG to ``path``.

    ``history`` is ``MetricsLogger.history``: ``[{"step": 10, "train_loss": 2.1}, {"step": 20, "eval_loss": 1.9}, ...]``.
    A step logged twice (a resumed run) keeps its last value. Returns ``path``.

    >>> plot_loss_curve([{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.5}], "/tmp/loss.png")
    '/tmp/loss.png'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    plotted = False
    for key in keys:
        points: dict[int, float] = {}
        for row in history:
            if key in row and "step" in row and row[key] is not None:
                points[int(row["step"])] = float(row[key])
        if points:
            steps = sorted(points)
            axes.plot(steps, [points[s] for s in steps], marker="o" if len(steps) < 30 else None, markersize=3, label=key)
            plotted = True
    if plotted:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
