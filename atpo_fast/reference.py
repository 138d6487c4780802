"""Plain float64 implementations of the method's definitions: the ground truth of the tests.

Written for clarity, not speed or memory: every function here materialises [N, V] float64.
"""

from __future__ import annotations

import torch

from atpo_fast._checks import IGNORE_INDEX
from atpo_fast.ops.step_rows import StepRows


def _invalid_rows(z: torch.Tensor) -> torch.Tensor:
    """Rows holding NaN or +inf, or nothing but -inf."""
    return torch.isnan(z).any(-1) | (z == float("inf")).any(-1) | (z == float("-inf")).all(-1)


def token_stats(logits: torch.Tensor, targets: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """entropy, top1_prob, margin, argmax, probs (and target_logprob) of softmax(logits) in float64.

    logits [..., V]; every output has the leading shape except probs [..., V]. Invalid rows give
    NaN and index -1.
    """
    z = logits.double()
    invalid = _invalid_rows(z)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)
    top = p.topk(2, dim=-1).values
    out = {
        "entropy": entropy,
        "top1_prob": top[..., 0],
        "margin": top[..., 0] - top[..., 1],
        "argmax": z.argmax(-1),
        "probs": p,
    }
    if targets is not None:
        out["target_logprob"] = logp.gather(-1, targets[..., None]).squeeze(-1)
    for name, value in out.items():
        if name == "argmax":
            out[name] = value.masked_fill(invalid, -1)
        elif name != "probs":
            out[name] = value.masked_fill(invalid, float("nan"))
    return out


def selected_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature)[target] in float64; targets of -100 give 0."""
    ignored = targets == IGNORE_INDEX
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    picked = logp.gather(-1, targets.masked_fill(ignored, 0)[..., None]).squeeze(-1)
    return picked.masked_fill(ignored, 0.0)


def step_stats(entropy, margin, token_mask, prev_entropy=None, relative=False) -> dict[str, torch.Tensor]:
    """Per-sequence mean entropy and margin over token_mask [..., L], count, and RoEC, in float64."""
    entropy, margin = entropy.double(), margin.double()
    count = token_mask.sum(-1)
    mean_h = torch.stack([e[m].mean() for e, m in zip(entropy.reshape(-1, entropy.shape[-1]),
                                                        token_mask.reshape(-1, token_mask.shape[-1]))])
    mean_m = torch.stack([g[m].mean() for g, m in zip(margin.reshape(-1, margin.shape[-1]),
                                                       token_mask.reshape(-1, token_mask.shape[-1]))])
    mean_h, mean_m = mean_h.reshape(count.shape), mean_m.reshape(count.shape)
    if prev_entropy is None:
        roec = torch.zeros_like(mean_h)
    else:
        roec = (mean_h - prev_entropy.double()).abs()
        if relative:
            roec = roec / (prev_entropy.double() + 1e-6)
    return {"entropy": mean_h, "margin": mean_m, "roec": roec, "count": count}


def llada_step(logits: torch.Tensor, tokens: torch.Tensor, mask_id: int, block_end: int, num_transfer: torch.Tensor,
               temperature: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One step of LLaDA's reference sampler after the forward: the new tokens [B, L].

    logits [B, L, V] for every position; LLaDA's float64 Gumbel noise (exp(z) / (-log u)^T) when
    temperature > 0; confidence = float64 softmax probability of the predicted token, -inf past
    the current block; top-k per row with k = num_transfer [B]. Like atpo_fast's sampler, the
    [MASK] token is excluded from the prediction (LLaDA leaves it in; its trained model gives it
    almost no mass, but an untrained one can predict it and leave a committed position masked).
    """
    z = logits.double().clone()
    z[..., mask_id] = float("-inf")
    if temperature > 0:
        noise = torch.rand(z.shape, dtype=torch.float64, device=z.device, generator=generator)
        predicted = (z.exp() / (-torch.log(noise)) ** temperature).argmax(-1)
    else:
        predicted = z.argmax(-1)
    confidence = torch.softmax(z, dim=-1).gather(-1, predicted[..., None]).squeeze(-1)
    confidence[:, block_end:] = float("-inf")
    masked = tokens == mask_id
    predicted = torch.where(masked, predicted, tokens)
    confidence = torch.where(masked, confidence, float("-inf"))
    commit = torch.zeros_like(masked)
    for row in range(tokens.shape[0]):
        commit[row, confidence[row].topk(int(num_transfer[row])).indices] = True
    return torch.where(commit, predicted, tokens)


def llada_generate(model, prompt_ids: torch.Tensor, gen_length: int, block_length: int, steps: int,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """LLaDA's reference generate (greedy, low_confidence remasking) written out: tokens [B, Lp + gen]."""
    batch, prompt_len = prompt_ids.shape
    tokens = torch.full((batch, prompt_len + gen_length), model.mask_id, dtype=torch.int64, device=prompt_ids.device)
    tokens[:, :prompt_len] = prompt_ids
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, gen_length)], dim=1)
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        start = prompt_len + block * block_length
        masked = (tokens[:, start:start + block_length] == model.mask_id).sum(1)
        base, remainder = masked // steps_per_block, masked % steps_per_block
        for i in range(steps_per_block):
            num_transfer = base + (i < remainder).long()
            logits = model.logits(tokens, attention_mask)
            tokens = llada_step(logits, tokens, model.mask_id, start + block_length, num_transfer)
    return tokens


def step_rows(tokens: torch.Tensor, step_map: torch.Tensor, starts: torch.Tensor, ends: torch.Tensor,
              mask_id: int) -> StepRows:
    """build_step_rows' definition, one row at a time: for each (sequence b, interval [s, e)) with
    s != -1, the row is tokens[b] with every position committed at a step >= s masked (the state
    before step s); its targets are the positions committed at steps in [s, e), in row-major order."""
    input_ids, target_mask, seq_index, step_start = [], [], [], []
    for b in range(tokens.shape[0]):
        for s, e in zip(starts[b].tolist(), ends[b].tolist()):
            if s == -1:
                continue
            ids = tokens[b].clone()
            ids[step_map[b] >= s] = mask_id
            input_ids.append(ids)
            target_mask.append((step_map[b] >= s) & (step_map[b] < e))
            seq_index.append(b)
            step_start.append(s)
    if not input_ids:
        empty = tokens.new_zeros(0, dtype=torch.int64)
        return StepRows(tokens.new_zeros(0, tokens.shape[1]), torch.zeros(0, tokens.shape[1], dtype=torch.bool,
                        device=tokens.device), empty, empty, empty, empty, empty)
    input_ids, target_mask = torch.stack(input_ids), torch.stack(target_mask)
    seq_index = torch.tensor(seq_index, device=tokens.device)
    target_row, target_pos = target_mask.nonzero(as_tuple=True)
    return StepRows(input_ids, target_mask, seq_index, torch.tensor(step_start, device=tokens.device), target_row,
                    target_pos, tokens[seq_index[target_row], target_pos])
