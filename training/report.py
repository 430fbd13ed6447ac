"""Classification metrics and the plots written next to a trained model."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict:
    """Top-1, per-class precision/recall/F1, confusion matrix (rows: true, cols: predicted)."""
    n = len(class_names)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (np.asarray(y_true), np.asarray(y_pred)), 1)
    per_class = {}
    for i, name in enumerate(class_names):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "support": actual,
        }
    total = int(confusion.sum())
    return {
        "top1": round(float(np.trace(confusion)) / total, 4) if total else 0.0,
        "num_images": total,
        "per_class": per_class,
        "confusion_matrix": confusion.tolist(),
        "class_names": list(class_names),
    }


def format_metrics(metrics: dict) -> str:
    lines = [f"top-1 {metrics['top1']:.2%} on {metrics['num_images']} photos", ""]
    lines.append(f"{'class':<14}{'precision':>10}{'recall':>9}{'f1':>8}{'support':>9}")
    for name, m in metrics["per_class"].items():
        lines.append(
            f"{name:<14}{m['precision']:>10.3f}{m['recall']:>9.3f}{m['f1']:>8.3f}{m['support']:>9}"
        )
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    names = metrics["class_names"]
    lines.append(" " * 14 + "".join(f"{n[:9]:>10}" for n in names))
    for name, row in zip(names, metrics["confusion_matrix"], strict=False):
        lines.append(f"{name[:13]:<14}" + "".join(f"{v:>10}" for v in row))
    return "\n".join(lines)


def plot_confusion(metrics: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(metrics["confusion_matrix"])
    names = metrics["class_names"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.2 * len(names) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), value in np.ndenumerate(matrix):
        color = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=color)
    ax.set_title(f"top-1 {metrics['top1']:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(log_csv: str | Path, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", loss_ax), ("accuracy", acc_ax)):
        for prefix in ("", "val_"):
            if prefix + key in rows[0]:
                ax.plot(epochs, [float(r[prefix + key]) for r in rows], label=prefix + key)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
