"""What a rollout leaves behind: the sequences, when each position was committed, and the per-step
signals (Trace). Selection, analysis and the trainer read these without importing the sampler."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass
class Trace:
    """Per-step signals of a rollout, each [B, T] (float32 unless noted; NaN where the set is empty)."""

    entropy: torch.Tensor  # mean entropy over the tokens committed at the step (H_t)
    margin: torch.Tensor  # mean p1 - p2 over the tokens committed at the step (CM_t)
    roec: torch.Tensor  # |H_t - H_{t-1}|, 0 at the first step
    surprisal: torch.Tensor  # mean -log p of the tokens committed at the step (untempered p, as sampled)
    candidate_entropy: torch.Tensor  # mean entropy over every masked candidate of the active block
    candidate_margin: torch.Tensor  # mean margin over the same candidates
    count: torch.Tensor  # int64: tokens committed from the model's prediction
    filled: torch.Tensor  # int64: positions committed as EOS in bulk (eos_fill)
    block: torch.Tensor  # int64 [T]: the block each step worked on (-1: a step added by `padded`)

    @property
    def num_steps(self) -> int:
        return self.count.shape[1]

    def padded(self, steps: int) -> Trace:
        """The trace widened to `steps` columns with steps nobody reached (NaN signals, zero counts)."""
        extra = steps - self.num_steps
        if extra == 0:
            return self
        fields = {"block": torch.cat([self.block, self.block.new_full((extra,), -1)])}
        for field in dataclasses.fields(self):
            if field.name != "block":
                value = getattr(self, field.name)
                fill = 0 if field.name in ("count", "filled") else float("nan")
                fields[field.name] = torch.cat([value, value.new_full((value.shape[0], extra), fill)], dim=1)
        return Trace(**fields)


@dataclasses.dataclass
class Rollout:
    tokens: torch.Tensor  # [B, L] int64, L = Lp + gen_length: the left-padded prompt, then the response
    step_map: torch.Tensor  # [B, L] int64: the step that committed each position; -1 on the prompt
    trace: Trace | None  # None when generate ran with record=False
    prompt_length: int  # Lp
    attention_mask: torch.Tensor  # [B, L]: 0 on left padding
    # [B, L] float32: log p of each committed token under the (untempered) distribution it was sampled
    # from; NaN on the prompt and on positions committed in bulk (eos_fill). None when not recorded.
    commit_logprob: torch.Tensor | None = None

    @property
    def response(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length:]

    @property
    def response_steps(self) -> torch.Tensor:
        """step_map of the response positions [B, gen_length]."""
        return self.step_map[:, self.prompt_length:]


def concat_rollouts(rollouts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of separate generate calls as one batch: prompts left-padded to the widest, traces
    widened to the longest (see Trace.padded) and given its block of each step."""
    if len(rollouts) == 1:
        return rollouts[0]
    width = max(r.prompt_length for r in rollouts)

    def left_pad(tensors, value):
        return torch.cat([F.pad(t, (width - r.prompt_length, 0), value=value) for t, r in zip(tensors, rollouts)])

    tokens = left_pad([r.tokens for r in rollouts], pad_id)
    attention = left_pad([r.attention_mask for r in rollouts], 0)
    step_map = left_pad([r.step_map for r in rollouts], -1)
    commit_logprob = None
    if all(r.commit_logprob is not None for r in rollouts):
        commit_logprob = left_pad([r.commit_logprob for r in rollouts], float("nan"))
    trace = None
    if all(r.trace is not None for r in rollouts):
        longest = max((r.trace for r in rollouts), key=lambda t: t.num_steps)
        traces = [r.trace.padded(longest.num_steps) for r in rollouts]
        trace = Trace(**{f.name: torch.cat([getattr(t, f.name) for t in traces]) if f.name != "block"
                         else longest.block for f in dataclasses.fields(Trace)})
    return Rollout(tokens, step_map, trace, width, attention, commit_logprob)
