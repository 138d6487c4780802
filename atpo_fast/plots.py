"""PNG plots of a run, written next to its metrics.jsonl.

    training.png        reward and accuracy of the rollouts per iteration, held-out greedy accuracy
    confusion_zones.png per-step entropy, margin and RoEC of held-out responses, correct against wrong
    selected_steps.png  which step indices the selection rule trained on, iteration by iteration
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from atpo_fast.analysis import column_means  # noqa: E402


def plot_training(path: Path, history: list[dict]) -> None:
    train = [m for m in history if "phase" not in m]
    evals = [(m["iteration"] + (0 if "phase" in m else 1), m["eval"]) for m in history if "eval" in m]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        its = [m["iteration"] + 1 for m in train]
        ax.plot(its, [m["reward"] for m in train], label="rollout reward", alpha=0.8)
        ax.plot(its, [m["accuracy"] for m in train], label="rollout accuracy", alpha=0.8)
    if evals:
        ax.plot([i for i, _ in evals], [e["accuracy"] for _, e in evals], "o-", color="black",
                label="held-out accuracy (greedy)")
    ax.set_xlabel("iteration")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion_zones(path: Path, curves: dict) -> None:
    correct = curves["correct"].bool()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, name in zip(axes, ("entropy", "margin", "roec")):
        values = curves[name].float()
        steps = torch.arange(values.shape[1])
        for label, rows, color in (("correct", correct, "tab:green"), ("wrong", ~correct, "tab:red")):
            ax.plot(steps.numpy(), column_means(values[rows]).numpy(), color=color,
                    label=f"{label} ({int(rows.sum())})")
        ax.set_title(name if name != "margin" else "margin (p1 - p2)")
        ax.set_xlabel("denoising step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_selected_steps(path: Path, history: list[dict]) -> None:
    rows = [m["selected_step_counts"] for m in history if "selected_step_counts" in m]
    if not rows:
        return
    width = max(map(len, rows))
    counts = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.float32)
    counts = counts / counts.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(7, 4))
    image = ax.imshow(counts.T.numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.set_xlabel("iteration")
    ax.set_ylabel("denoising step")
    ax.set_title("share of training rows per step")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(run_dir: Path, history: list[dict], curves: dict) -> None:
    plot_training(run_dir / "training.png", history)
    plot_confusion_zones(run_dir / "confusion_zones.png", curves)
    plot_selected_steps(run_dir / "selected_steps.png", history)
