"""Block KV caches for batched rollouts (Fast-dLLM's prefix and dual caches), on any DiffusionLM whose
`backbone` is a transformers decoder stack run bidirectionally (the tiny model and the native
LLaDA / Dream loaders).

When a block starts, one full forward over the whole sequence gives the first step's predictions
and every layer's keys and values. The cache keeps those of the positions outside the steps'
queries: "prefix" keeps the positions before the block and recomputes the block and everything
after it at each step; "dual" also keeps the positions after the block and recomputes the block
alone. The kept keys and values are those of the block's first state, so later steps of the block
see a slightly stale context (the method's approximation; "none" is exact). Every row of a batch
is handled at once: left padding stays masked and positions count from each row's first real
token, as in the full forward. The keys and values stay in one buffer per layer in sequence
order; each step writes its queries' own over the stored ones in place (on 2 CPU cores a dual step
at the benchmark's shape took 9% less time than concatenating the kept ones with the new ones).
The steps read the final hidden states of the block alone, so the last decoder layer of a block
start's forward and of a prefix step computes only the keys and values of the other positions
(their queries, attention and MLP would feed nothing); a prefix step's block logits were
bit-identical in a test at the benchmark's shape.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from atpo_fast.choices import CACHE_MODES
from atpo_fast.models.base import DiffusionLM, bidirectional_hidden_states, positions_from_mask


class BlockCache:
    """Keys and values outside one block's queries, for the steps of that block.

    tokens [B, L] int64 (the state when the block starts), attention_mask [B, L] or None (1 = real),
    window: the block's positions. logits_at answers the first call from the full forward and
    later ones from a forward over the query positions only.
    """

    def __init__(self, model: DiffusionLM, tokens: torch.Tensor, attention_mask: torch.Tensor | None, window: slice,
                 mode: str):
        if mode not in CACHE_MODES or mode == "none":
            raise ValueError(f"cache must be one of {CACHE_MODES[1:]} for a BlockCache, got {mode!r}")
        backbone = getattr(model, "backbone", None)
        if backbone is None or not hasattr(backbone, "config"):
            raise ValueError(f"a KV cache needs a model with a transformers backbone (the tiny model, or LLaDA / "
                             f"Dream loaded with implementation='native'); {type(model).__name__} has none")
        self.model, self.backbone = model, backbone
        length = tokens.shape[1]
        self.mask = torch.ones_like(tokens) if attention_mask is None else attention_mask
        self.positions = positions_from_mask(self.mask)
        # queries: the block (from one position earlier when position i predicts token i + 1), plus the
        # rest of the sequence for the prefix cache
        self.q0 = max(window.start - int(model.shift), 0)
        self.q1 = window.stop if mode == "dual" else length
        self.block_rows = window.stop - self.q0  # the leading queries whose final hidden states are read
        cache = DynamicCache()
        # transformers renamed forward's past_key_values to cache (5.2x); pass it under the name this one takes
        self.cache_arg = "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"
        rows = slice(self.q0, window.stop)
        with _last_layer_output_at_rows(backbone, rows, length, cache):
            full = bidirectional_hidden_states(backbone, tokens, self.mask, use_cache=True, **{self.cache_arg: cache})
        # the block's first step, exact: the final hidden states of the rows from q0 ([B, block_rows, D])
        self.first_hidden = full[:, rows] if full.shape[1] == length else full
        # every position's keys and values stay where they are; a step overwrites its queries' own in place
        cache.layers = [_QueryWindowLayer(layer.keys, layer.values, self.q0) for layer in cache.layers]
        self.cache = cache

    def logits_at(self, tokens: torch.Tensor, batch_index: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] at (batch_index[r], positions[r]), positions inside the block."""
        if self.first_hidden is not None:
            hidden, self.first_hidden = self.first_hidden, None
        else:
            batch, length = self.mask.shape
            keys = self.mask.bool()[:, None, None, :].expand(batch, 1, self.q1 - self.q0, length)
            with _last_layer_output_at_rows(self.backbone, slice(0, self.block_rows), self.q1 - self.q0, self.cache):
                hidden = self.backbone(input_ids=tokens[:, self.q0:self.q1], attention_mask=keys,
                                       position_ids=self.positions[:, self.q0:self.q1],
                                       use_cache=True, **{self.cache_arg: self.cache}).last_hidden_state
        raw = (positions - int(self.model.shift)).clamp_min(0)  # the query that predicts each position
        return self.model.head_logits(hidden[batch_index, raw - self.q0])


class _QueryWindowLayer(DynamicLayer):
    """One layer's keys and values [B, H, L, Dh] of every position, in sequence order. A cached step's
    forward hands in those of its queries (positions start, start + 1, ...): they are written over the
    stored ones in place, and attention sees the whole sequence (no concatenation, no copy of the rest)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        super().__init__()
        self.keys, self.values, self.start = keys, values, start
        self.is_initialized, self.device, self.dtype = True, keys.device, keys.dtype

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        stop = self.start + key_states.shape[-2]
        self.keys[:, :, self.start:stop] = key_states
        self.values[:, :, self.start:stop] = value_states
        return self.keys, self.values


@contextlib.contextmanager
def _last_layer_output_at_rows(backbone: nn.Module, rows: slice, length: int, cache: DynamicCache):
    """Within: the backbone's last decoder layer, given `length` positions, returns those of `rows` only,
    every position's keys and values going to `cache`. The block's steps read the final hidden states of
    the block alone: a block start's full forward and a prefix step's (block and what follows) need no
    more. Nothing changes when every position is read (a dual step), nor for a layer sharded by FSDP2,
    whose weights are gathered by its own forward, which this bypasses."""
    last = backbone.layers[-1]
    if rows.stop - rows.start >= length or hasattr(last, "unshard"):
        yield
        return
    backbone.layers[-1] = _RowsLayer(last, rows, cache)
    try:
        yield
    finally:
        backbone.layers[-1] = last


class _RowsLayer(nn.Module):
    """A Llama / Qwen2 decoder layer whose output covers only the positions `rows` of its input.

    Every position's keys and values are still computed and written to the cache (the rows attend to
    them), but the queries, attention, output projection and MLP of the other positions are skipped:
    of a block start's forward at the rollout benchmark's shape (a block of 32 in 384 positions), about
    85% of the last layer's work. The rows get what the whole layer gives them.
    """

    def __init__(self, layer: nn.Module, rows: slice, cache: DynamicCache):
        super().__init__()
        self.layer, self.rows, self.cache = layer, rows, cache

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **_) -> torch.Tensor:
        layer, rows = self.layer, self.rows
        attn = layer.self_attn
        family = sys.modules[type(attn).__module__]  # the model family's own RoPE and eager attention
        normed = layer.input_layernorm(hidden_states)
        batch, n = normed.shape[0], rows.stop - rows.start
        cos, sin = position_embeddings

        def heads(x: torch.Tensor) -> torch.Tensor:  # [B, L, H * Dh] -> [B, H, L, Dh]
            return x.view(batch, x.shape[1], -1, attn.head_dim).transpose(1, 2)

        def rotated(x: torch.Tensor, positions: slice) -> torch.Tensor:
            # the family's helper rotates a (query, key) pair at one set of positions; queries and keys
            # cover different positions here, so each goes in alone (the pair's second half is dropped)
            return family.apply_rotary_pos_emb(x, x, cos[:, positions], sin[:, positions])[0]

        query = rotated(heads(attn.q_proj(normed[:, rows])), rows)
        key = rotated(heads(attn.k_proj(normed)), slice(None))
        key, value = self.cache.update(key, heads(attn.v_proj(normed)), attn.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, family.eager_attention_forward)
        mask = attention_mask
        if mask is not None and mask.dim() == 4 and mask.shape[2] > 1:  # [B, 1, queries, keys]
            mask = mask[:, :, rows]
        out, _ = attend(attn, query, key, value, mask, dropout=0.0, scaling=attn.scaling)
        hidden = hidden_states[:, rows] + attn.o_proj(out.reshape(batch, n, -1).contiguous())
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))
