"""ATPO step selection: which denoising steps of each rollout become training rows.

Every rule spends the same budget of k rows per response. A step t "is reached" by a response
that committed at least one token there (for the masked token set: that still had candidates).
    uniform   TraceRL: intervals [j*s, (j+1)*s), s = ceil(T / k)
    random    k reached steps uniformly without replacement, per response
    entropy   top-k steps by H_t        margin  top-k by 1 - CM_t (lowest margin first)
    roec      top-k by RoEC_t           hybrid  (ATPO) alpha * RoEC~ + (1 - alpha) * (1 - CM)~, where ~
              is min-max normalisation over t
    surprisal Drift / RLDF: k reached steps drawn without replacement with probability softmax(S_t / tau),
              S_t the mean surprisal -log p of the tokens committed at t (Gumbel top-k; tau = 0: top-k)
EGSPO's rule is entropy with per="trajectory".
per="batch" (default) averages each signal per step index over the responses that reach it, so
all responses share the selected steps; per="trajectory" ranks each response on its own signals.
Ties go to the earlier step. mode="select": each selected step t is the row [t, t + 1);
mode="partition": the selected steps start the rows (the first row starts at 0), so every
committed token is a target of exactly one row.
"""

from __future__ import annotations

import math

import torch

from atpo_fast._checks import check_seed
from atpo_fast.choices import MODES
from atpo_fast.distributed import all_reduce
from atpo_fast.trace import Trace



def step_signals(trace: Trace, token_set: str = "committed") -> dict[str, torch.Tensor]:
    """entropy, uncertainty (1 - CM), roec, surprisal and reached, each [B, T], over the chosen token set
    (surprisal is that of the committed tokens in both: the masked candidates have none)."""
    if token_set == "committed":
        entropy, margin, roec = trace.entropy, trace.margin, trace.roec
        reached = trace.count > 0
    elif token_set == "masked":
        entropy, margin = trace.candidate_entropy, trace.candidate_margin
        roec = torch.zeros_like(entropy)
        roec[:, 1:] = (entropy[:, 1:] - entropy[:, :-1]).abs()
        reached = ~entropy.isnan()
    else:
        raise ValueError(f"token_set must be 'committed' or 'masked', got {token_set!r}")
    return {"entropy": entropy, "uncertainty": 1 - margin, "roec": roec, "surprisal": trace.surprisal,
            "reached": reached}


def reached_sum(values: torch.Tensor, reached: torch.Tensor) -> torch.Tensor:
    """Sum over the responses that reach each step: [B, T] -> [T] (this rank's; NaN entries count 0)."""
    return torch.where(reached, values.nan_to_num(), 0.0).sum(0)


def batch_average(values: torch.Tensor, reached: torch.Tensor, group=None) -> torch.Tensor:
    """Mean over the responses that reach each step: [B, T] -> [T] (NaN where none does). With a
    torch.distributed process group, over every rank's responses (each rank passes the same T)."""
    total = reached_sum(values, reached)
    sums = all_reduce(torch.stack([total, reached.sum(0).to(total.dtype)]), group=group)
    return sums[0] / sums[1]


def _min_max(values: torch.Tensor) -> torch.Tensor:
    """Min-max normalise over the last dim, ignoring NaN; a constant row becomes 0."""
    low = torch.where(values.isnan(), float("inf"), values).amin(-1, keepdim=True)
    high = torch.where(values.isnan(), float("-inf"), values).amax(-1, keepdim=True)
    span = high - low
    return torch.where(span > 0, (values - low) / torch.where(span > 0, span, 1.0), 0.0)


def hybrid_score(roec: torch.Tensor, uncertainty: torch.Tensor, alpha: float) -> torch.Tensor:
    """ATPO's score [..., T]: alpha * RoEC~ + (1 - alpha) * (1 - CM)~, min-max normalised over T
    (NaN steps are ignored by the normalisation and stay NaN)."""
    return alpha * _min_max(roec) + (1 - alpha) * _min_max(uncertainty)


def step_scores(trace: Trace, rule: str, alpha: float = 0.5, per: str = "batch",
                token_set: str = "committed", group=None) -> torch.Tensor:
    """Selection score per step [B, T] (higher is chosen first); NaN where a step cannot be chosen.
    group: see batch_average."""
    signals = step_signals(trace, token_set)
    reached = signals["reached"]
    if per == "batch":
        signals = {name: batch_average(v, reached, group)[None].expand_as(v)
                   for name, v in signals.items() if name != "reached"}
        valid = (all_reduce(reached.sum(0), group=group) > 0)[None].expand_as(reached)
    elif per == "trajectory":
        valid = reached
    else:
        raise ValueError(f"per must be 'batch' or 'trajectory', got {per!r}")
    score = SCORE_RULES[rule]({name: torch.where(valid, v, float("nan")) for name, v in signals.items()
                               if name != "reached"}, alpha)
    return torch.where(valid & ~score.isnan(), score, float("nan"))


INTERVAL_RULES = ("uniform", "random")  # the rules that are no score over the signals
# rules that rank steps by a score: signals (entropy, uncertainty, roec, surprisal, each [B, T], NaN where a
# step cannot be chosen) and alpha -> score [B, T], the highest chosen first
SCORE_RULES = {
    "entropy": lambda s, alpha: s["entropy"],
    "margin": lambda s, alpha: s["uncertainty"],
    "roec": lambda s, alpha: s["roec"],
    "hybrid": lambda s, alpha: hybrid_score(s["roec"], s["uncertainty"], alpha),
    "surprisal": lambda s, alpha: s["surprisal"],
}


def rule_names() -> tuple[str, ...]:
    """Every rule select_steps accepts: the interval rules, the built-in score rules and the registered ones."""
    return INTERVAL_RULES + tuple(SCORE_RULES)


def register_rule(name: str, score) -> None:
    """Add a selection rule usable as select_steps(rule=name) and as selection.rule in any config loaded
    after it (YAML and overrides included): score(signals, alpha) -> [B, T] float, higher chosen first
    (NaN: never), where signals holds "entropy", "uncertainty" (1 - margin), "roec" and "surprisal", each
    [B, T] (per="batch": averaged over the batch; NaN at steps that cannot be chosen). The budget, modes
    and data-parallel averaging apply as for the built-in rules."""
    if name in INTERVAL_RULES or not callable(score):
        raise ValueError(f"register_rule needs a new name (not 'uniform' or 'random') and a callable, got {name!r}")
    SCORE_RULES[name] = score


def _uniforms(seed: int | None, row_offset: int, batch: int, steps: int) -> torch.Tensor:
    """U(0, 1) draws [batch, steps] for the responses row_offset.. of the whole batch (keyed by seed)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.rand(row_offset + batch, steps, generator=generator)[row_offset:]


def select_steps(trace: Trace, budget: int, rule: str = "hybrid", mode: str = "select", alpha: float = 0.5,
                 per: str = "batch", seed: int | None = None, token_set: str = "committed", *,
                 tau: float = 1.0, group=None, row_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Intervals to train on: starts, ends [B, budget] int64, -1 in both for an unused slot.

    tau: the surprisal rule's softmax temperature (0: the top-k steps by surprisal, no draw).

    Data-parallel use: group (a torch.distributed process group) averages the per="batch" signals
    over every rank's responses; row_offset (this rank's first response in the global batch) keys
    the random rule's draws, so the selection does not depend on how the batch is split.
    """
    if not isinstance(trace, Trace):
        raise ValueError(f"trace must be a Trace (generate records one unless record=False), got "
                         f"{type(trace).__name__}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"budget must be a positive int, got {budget!r}")
    if rule not in rule_names():
        raise ValueError(f"rule must be one of {rule_names()}, got {rule!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if not tau >= 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    check_seed(seed)
    batch, steps = trace.count.shape
    starts = torch.full((batch, budget), -1, dtype=torch.int64)
    ends = starts.clone()
    if steps == 0:
        return starts, ends
    if rule == "uniform":
        size = math.ceil(steps / budget)
        bounds = torch.arange(0, steps, size)
        starts[:, :len(bounds)] = bounds
        ends[:, :len(bounds)] = (bounds + size).clamp(max=steps)
        return starts, ends
    if rule == "random":
        reached = step_signals(trace, token_set)["reached"].cpu()
        score = torch.where(reached, _uniforms(seed, row_offset, batch, steps), float("nan"))
    else:
        score = step_scores(trace, rule, alpha, per, token_set, group).cpu()
    if rule == "surprisal" and tau > 0:  # Gumbel top-k: k draws without replacement from softmax(score / tau)
        score = score / tau - torch.log(-torch.log(_uniforms(seed, row_offset, batch, steps).clamp_min(1e-12)))
    for row in range(batch):
        order = torch.where(score[row].isnan(), float("-inf"), score[row]).argsort(descending=True, stable=True)
        chosen = order[:min(budget, int((~score[row].isnan()).sum()))].sort().values
        n = len(chosen)
        if n == 0:
            continue
        if mode == "select":
            starts[row, :n], ends[row, :n] = chosen, chosen + 1
        else:
            starts[row, :n] = chosen
            starts[row, 0] = 0
            ends[row, :n - 1], ends[row, n - 1] = chosen[1:], steps
    return starts, ends
