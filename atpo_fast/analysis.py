"""Confusion-zone analysis: where in the denoising trajectory do wrong answers show themselves?

From rollouts with their per-step trace and correctness: the mean entropy, margin, RoEC and
surprisal per step for correct against wrong responses; how well each step's signal predicts
failure (AUROC, with high entropy, low margin, high RoEC and high surprisal read as "likely
wrong"); the contiguous step window whose averaged signal predicts failure best; how few steps
hold most of that power; and where a selection rule's steps fall. This
reproduces the paper's analysis on whatever model and task the user has.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from atpo_fast.trace import Trace

# signal name -> (trace field, sign that makes "larger" mean "more likely wrong")
SIGNALS = {"entropy": ("entropy", 1.0), "margin": ("margin", -1.0), "roec": ("roec", 1.0),
           "surprisal": ("surprisal", 1.0)}


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting half; NaN if a class is empty.

    scores [N] (NaN entries are dropped), positive [N] bool.
    """
    keep = ~scores.isnan()
    scores, positive = scores[keep].double(), positive[keep].bool()
    n_pos = int(positive.sum())
    n_neg = len(scores) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U from ranks (tied scores share their mean rank): O(N log N), not N_pos x N_neg pairs
    _, group, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based
    u = mean_rank[group][positive].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()


def per_step_auroc(signal: torch.Tensor, failed: torch.Tensor) -> list[float]:
    """AUROC of signal[:, t] [N, T] for predicting `failed` [N], for every step t."""
    return [auroc(signal[:, t], failed) for t in range(signal.shape[1])]


def best_window(signal: torch.Tensor, failed: torch.Tensor, max_width: int | None = None) -> dict:
    """The window [start, end) whose per-response mean signal predicts failure best (ties: earliest, narrowest)."""
    steps = signal.shape[1]
    best = {"start": 0, "end": 0, "auroc": float("nan")}
    for width in range(1, (max_width or steps) + 1):
        for start in range(0, steps - width + 1):
            score = auroc(signal[:, start:start + width].nanmean(1), failed)
            if score == score and not score <= best["auroc"]:
                best = {"start": start, "end": start + width, "auroc": score}
    return best


def column_means(values: torch.Tensor) -> torch.Tensor:
    """Mean of each column of [N, T] over its non-NaN entries [T] (NaN where there are none, or N = 0)."""
    return values.nanmean(0) if values.shape[0] else torch.full(values.shape[1:], float("nan"))


def concentration(aurocs: list[float], share: float = 0.8) -> float:
    """The smallest fraction of steps whose predictive power |AUROC_t - 0.5| adds up to `share` of all
    steps' (NaN steps left out; NaN when no step has any): low means the signal sits in a few steps."""
    power = sorted((abs(a - 0.5) for a in aurocs if a == a), reverse=True)
    total, running = sum(power), 0.0
    if not total:
        return float("nan")
    for count, p in enumerate(power, 1):
        running += p
        if running >= share * total - 1e-12:
            return count / len(power)
    return 1.0


def _number(value: float) -> float | None:
    """A float for JSON: NaN becomes None."""
    return None if value != value else round(value, 6)


def _mean(values: torch.Tensor) -> list[float | None]:
    return [_number(v) for v in column_means(values).tolist()]


def confusion_zone_report(trace: Trace, correct: torch.Tensor, selected_counts: torch.Tensor | None = None) -> dict:
    """Curves, per-step AUROC and best windows for entropy, margin, RoEC and surprisal; shares of selected steps."""
    correct = correct.bool().cpu()
    failed = ~correct
    report = {"responses": len(correct), "correct": int(correct.sum()), "steps": trace.num_steps, "signals": {}}
    for name, (field, sign) in SIGNALS.items():
        values = getattr(trace, field).float().cpu()
        aurocs = per_step_auroc(sign * values, failed)
        report["signals"][name] = {
            "mean_correct": _mean(values[correct]), "mean_wrong": _mean(values[failed]),
            "auroc_per_step": [_number(a) for a in aurocs],
            "best_window": best_window(sign * values, failed),
            "steps_for_80pct_power": _number(concentration(aurocs)),
        }
    if selected_counts is not None:
        counts = selected_counts.float()
        report["selected_share"] = (counts / counts.sum().clamp_min(1)).tolist()
    return report


def plot_report(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(report["signals"]), figsize=(4.3 * len(report["signals"]), 6.5), sharex=True)
    for col, (name, data) in enumerate(report["signals"].items()):
        nan = float("nan")
        for key, color in (("mean_correct", "tab:green"), ("mean_wrong", "tab:red")):
            axes[0, col].plot([nan if v is None else v for v in data[key]], color=color, label=key.split("_")[1])
        axes[0, col].set_title(name)
        axes[1, col].plot([nan if v is None else v for v in data["auroc_per_step"]], color="black", label="AUROC")
        axes[1, col].axhline(0.5, color="grey", lw=0.8)
        window = data["best_window"]
        axes[1, col].axvspan(window["start"] - 0.5, window["end"] - 0.5, color="tab:orange", alpha=0.25,
                             label=f"best window {window['start']}-{window['end']} ({window['auroc']:.2f})")
        if "selected_share" in report:
            axes[1, col].bar(range(len(report["selected_share"])), report["selected_share"], color="tab:blue",
                             alpha=0.3, label="selected share")
        axes[1, col].set_xlabel("denoising step")
        axes[1, col].legend(fontsize=7)
    axes[0, 0].legend()
    fig.suptitle(f"{report['correct']} of {report['responses']} responses correct")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def analyze_run(run_dir: str | Path, samples: int = 4, temperature: float = 1.0, size: int | None = None) -> dict:
    """Roll out a run's checkpoint on its held-out problems (samples per problem) and write
    analysis.json and analysis.png into the run folder."""
    from atpo_fast.checkpoint import load_run
    from atpo_fast.common import derive_seed
    from atpo_fast.selection import select_steps

    run_dir = Path(run_dir)
    trainer = load_run(run_dir)
    config = trainer.config
    examples = trainer.task.test[:size or config.eval.size]
    rollout = trainer.rollout(examples, samples, temperature, derive_seed(config.seed, "analysis"))
    _, correct = trainer.score(examples, samples, rollout)
    sel = config.selection
    starts, _ = select_steps(rollout.trace, sel.budget, sel.rule, sel.mode, sel.alpha, sel.per, seed=0, tau=sel.tau,
                             token_set=sel.token_set)
    counts = torch.bincount(starts[starts >= 0], minlength=rollout.trace.num_steps)
    report = confusion_zone_report(rollout.trace, correct, counts)
    report.update(run_dir=str(run_dir), samples=samples, temperature=temperature, rule=sel.rule)
    (run_dir / "analysis.json").write_text(json.dumps(report, indent=2))
    plot_report(report, run_dir / "analysis.png")
    return report
