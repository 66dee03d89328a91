"""Loss curve PNG."""

from __future__ import annotations

from matplotlib.image import imread

from lorafleet.tracking import plot_loss_curve


def test_plot_loss_curve_writes_a_png(tmp_path):
    history = [{"step": s, "train_loss": 2.0 / s, "learning_rate": 1e-4} for s in range(1, 21)]
    history += [{"step": 10, "eval_loss": 0.5}, {"step": 20, "eval_loss": 0.3}]
    path = plot_loss_curve(history, str(tmp_path / "plots" / "loss_curve.png"), title="banking77")
    assert path == str(tmp_path / "plots" / "loss_curve.png")
    data = (tmp_path / "plots" / "loss_curve.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # something was drawn


def test_plot_loss_curve_without_losses_still_writes(tmp_path):
    path = plot_loss_curve([{"step": 1, "learning_rate": 1e-4}], str(tmp_path / "empty.png"))
    assert imread(path).shape[0] > 0
