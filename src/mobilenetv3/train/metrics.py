"""The run folder's records, written by rank 0 only: metrics.jsonl, metrics.csv, TensorBoard, curves.png.

metrics.jsonl is the source of truth (one JSON object per epoch); the CSV and the plot are regenerated
from it after every epoch, so they always agree with it, also after a resume.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..weights.io import atomic_write

logger = logging.getLogger(__name__)

#: Keys every metrics row has (accuracies in percent).
REQUIRED_KEYS = (
    "epoch", "step", "lr", "train_loss", "val_loss", "val_top1", "val_top5", "val_samples", "world_size",
    "epoch_time_s", "skipped_samples",
)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise UserError(f"{path}, line {number}, is not a JSON object: {line[:80]!r}") from None
            # A process killed (or a disk filled) in the middle of an append leaves a torn last line.
            logger.warning("%s: ignoring its torn last line (the run died while writing it)", path)
    return rows


class MetricsWriter:
    """Appends epoch rows; a no-op on ranks other than 0."""

    def __init__(self, folder: str | Path, *, enabled: bool, reference_top1: float | None = None,
                 reference_label: str | None = None, title: str = "") -> None:
        self.folder = Path(folder)
        self.enabled = enabled
        self.reference_top1, self.reference_label = reference_top1, reference_label
        self.title = title
        self.jsonl = self.folder / "metrics.jsonl"
        self.tensorboard = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        try:  # tensorboard is an optional extra
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(self.folder / "tensorboard"))
        except ImportError:
            logger.info("tensorboard is not installed: no TensorBoard events (pip install tensorboard)")

    def truncate_after(self, epochs_done: int) -> None:
        """On resume: drop rows of epochs the checkpoint does not contain (they will be redone)."""
        if not self.enabled:
            return
        rows = [row for row in read_rows(self.jsonl) if row["epoch"] <= epochs_done]
        text = "".join(json.dumps(row) + "\n" for row in rows)
        atomic_write(self.jsonl, lambda tmp: Path(tmp).write_text(text))

    def record(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Append `row`; returns every row of the run so far (empty on ranks other than 0)."""
        if not self.enabled:
            return []
        with open(self.jsonl, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows = read_rows(self.jsonl)
        self._write_csv(rows)
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("epoch",) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, row["epoch"])
            self.tensorboard.flush()
        plot_curves(rows, self.folder / "curves.png", reference_top1=self.reference_top1,
                    reference_label=self.reference_label, title=self.title)
        return rows

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        columns: list[str] = []
        for row in rows:
            columns += [key for key in row if key not in columns]

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.folder / "metrics.csv", write)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plot_curves(rows: list[dict[str, Any]], path: str | Path, *, reference_top1: float | None = None,
                reference_label: str | None = None, title: str = "") -> Path | None:
    """Loss (train, val) and top-1 / top-5, or a segmentation run's mIoU / pixel accuracy (val, and EMA / SWA when
    present) per epoch, with the claimed top-1."""
    if not rows:
        return None
    # Here, not at the top: the file-only Agg backend must be chosen before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(11, 4))

    def plot(axes, key: str, style: str) -> None:  # SWA columns start at the first averaged epoch
        present = [row for row in rows if key in row]
        if present:
            axes.plot([row["epoch"] for row in present], [row[key] for row in present], style, marker=".", label=key)

    for key, style in (("train_loss", "-"), ("val_loss", "-"), ("ema_val_loss", "--"), ("swa_val_loss", "--")):
        plot(loss_axes, key, style)
    loss_axes.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_axes.legend()
    for key, style in (("val_top1", "-"), ("val_top5", "-"), ("ema_val_top1", "--"), ("swa_val_top1", "--"),
                       ("val_miou", "-"), ("val_pixel_acc", "-"), ("ema_val_miou", "--"), ("swa_val_miou", "--"),
                       ("val_map", "-"), ("val_map_50", "-"), ("ema_val_map", "--"), ("swa_val_map", "--"),
                       ("train_top1", ":")):
        plot(acc_axes, key, style)
    if reference_top1 is not None:
        acc_axes.axhline(reference_top1, color="gray", linestyle="-.",
                         label=reference_label or f"claimed top-1 {reference_top1}%")
    acc_axes.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    acc_axes.legend(loc="lower right")
    acc_axes.grid(alpha=0.3)
    loss_axes.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=90))
    plt.close(figure)
    return path
