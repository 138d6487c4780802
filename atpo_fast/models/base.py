"""The interface the sampler and the trainer use to drive a masked-diffusion language model."""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch import nn

from atpo_fast.ops.fused_linear_logprobs import fused_linear_logprobs


def bidirectional(backbone: nn.Module) -> nn.Module:
    """A transformers decoder stack with every causal flag off (no layer may fall back to a causal kernel)."""
    for module in backbone.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return backbone


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, L] of a left-padded batch: counted from each row's first real token (0 on padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def predicting_each_token(hidden: torch.Tensor) -> torch.Tensor:
    """A shifted model's hidden states [B, L, D] moved so that index i predicts token i (position i of
    the model predicts token i + 1; index 0 keeps its own)."""
    return torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)


def bidirectional_hidden_states(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                                **backbone_kwargs) -> torch.Tensor:
    """Last hidden states [B, L, D] of a bidirectional transformers stack for left-padded input_ids [B, L]:
    every position attends to every real token (a [B, 1, L, L] key mask), and positions count from
    each row's first real token, so a padded row computes what it computes alone. backbone_kwargs go
    to the backbone's forward (a KV cache to fill, for one)."""
    batch, length = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keys = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)
    backbone_kwargs.setdefault("use_cache", False)  # no KV cache unless one is asked for
    return backbone(input_ids=input_ids, attention_mask=keys, position_ids=positions_from_mask(attention_mask),
                    **backbone_kwargs).last_hidden_state


def encode_with_chat_template(tokenizer, text: str) -> list[int]:
    """A task prompt as a transformers tokenizer's chat template lays out one user turn (plain text
    encoding when the tokenizer has no template)."""
    if getattr(tokenizer, "chat_template", None):
        # asked for as a dict: transformers 5 returns one by default (a list of ids before), and list() of
        # it was its keys
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return tokenizer.encode(text)


def decode_until_eos(tokenizer, ids: torch.Tensor, eos_id: int | None) -> str:
    """Text of a response's ids [gen_length] up to its first EOS, special tokens dropped."""
    ids = ids.tolist()
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


# the smallest nn.Linear weight (elements) that DiffusionLM.prepacked_weights lays out for oneDNN. On 2 Intel
# Xeon cores (torch 2.13), the laid-out weight against F.linear: 0.58-0.87x the time below it (128 x 512 at
# 16-512 rows), 0.91-1.25x at 256 x 1024, 1.11-1.18x at 1024 x 2816 and 128 rows, 1.0x at 1536 rows
MIN_PREPACKED_WEIGHT = 1 << 18


class _PrepackedLinear:
    """An nn.Linear's forward that multiplies no-grad CPU inputs of the weight's dtype by a copy of the
    weight laid out once for oneDNN (torch.ops.mkldnn._reorder_linear_weight); other calls go to F.linear."""

    def __init__(self, linear: nn.Linear):
        self.linear = linear
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        linear = self.linear
        if x.device.type == "cpu" and x.dtype == self.packed.dtype and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, linear.bias, "none", [], "")
        return F.linear(x, linear.weight, linear.bias)


def _available_memory() -> float:
    """Bytes of memory the system reports available (inf where it does not say)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")


class DiffusionLM(nn.Module):
    """A bidirectional model that predicts the tokens at [MASK] positions.

    Subclasses set mask_id, vocab_size, max_length, eos_id and pad_id, implement `_hidden_states`
    (final hidden states, after the last norm, as the model lays them out) and `lm_head` (an
    nn.Linear with weight [V, D]). With `shift` (Dream), the model predicts token i+1 at position i;
    everything this class returns is realigned so that index i predicts token i.
    """

    mask_id: int
    vocab_size: int
    max_length: int
    eos_id: int | None = None
    pad_id: int = 0
    shift: bool = False

    @property
    def lm_head(self) -> nn.Linear:
        raise NotImplementedError

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a task prompt, as the model expects it (a chat template for instruct models)."""
        raise NotImplementedError

    def encode_prompts(self, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids [B, Lp] int64 (pad_id on the left) and their attention mask [B, Lp]."""
        ids = [self.encode_prompt(t) for t in texts]
        width = max(map(len, ids))
        tokens = torch.tensor([[self.pad_id] * (width - len(i)) + i for i in ids], dtype=torch.int64, device=device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], dtype=torch.int64, device=device)
        return tokens, mask

    def decode(self, ids: torch.Tensor) -> str:
        """Text of a response [gen_length], up to its first EOS, special tokens dropped."""
        raise NotImplementedError

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states [B, L, D] for input_ids [B, L] (attention_mask [B, L]: 1 = real token)."""
        hidden = self._hidden_states(input_ids, attention_mask)
        return predicting_each_token(hidden) if self.shift else hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_index: torch.Tensor,
                positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """float32 log p(targets[r]) [R] at the R positions (batch_index[r], positions[r]), with gradients.

        The training entry point: hidden states at the targets only, then fused_linear_logprobs
        (the [R, V] logits are never held; the LM head runs outside autocast, in its own dtype).
        p is the softmax over the vocabulary without [MASK], the distribution the sampler draws from.
        Being the forward, it is what DDP and FSDP hook.
        """
        hidden = self.hidden_states(input_ids, attention_mask)[batch_index, positions]
        head = self.lm_head
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_logprobs(hidden, head.weight, targets, bias=self._bias_without_mask())

    def _bias_without_mask(self) -> torch.Tensor:
        """The LM head's bias (zeros when it has none) with -inf at mask_id: [MASK] leaves the softmax."""
        weight, bias = self.lm_head.weight, self.lm_head.bias
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return bias.index_fill(0, torch.tensor([self.mask_id], device=weight.device), float("-inf"))

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L, V]. Prefer logits_at: it applies the LM head to the needed positions only."""
        return self.head_logits(self.hidden_states(input_ids, attention_mask))

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_index: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] at the R positions (batch_index[r], positions[r]) only."""
        return self.head_logits(self.hidden_states(input_ids, attention_mask)[batch_index, positions])

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden [R, D]: logits [R, V] in hidden's dtype, F.linear's values (within rounding
        inside prepacked_weights, for no-grad calls on a CPU float32 head)."""
        return self.lm_head(hidden)

    @contextlib.contextmanager
    def prepacked_weights(self):
        """Within: no-grad calls of the model's CPU float32 nn.Linear layers (the LM head and the decoder
        layers' projections) multiply by a copy of their weight laid out once in oneDNN's blocked format,
        instead of F.linear laying it out again at every call. generate() holds one for each rollout.

        On a 2-core Intel Xeon, LLaDA's 126464 x 1024 head over one block's steps (128, 124, ..., 4 rows)
        took 2.37 s against 2.91 s with F.linear, and a cached step's 128-row projections at width 1024
        run 1.11-1.18x faster (values within rounding). The copies cost the weights' size in memory and
        one pass over them; nothing is laid out when they would take more than half the memory the system
        reports available. The weights must not change inside. Untouched: weights under MIN_PREPACKED_WEIGHT
        elements (slower laid out), CUDA, 16-bit, sharded (DTensor) weights, a torch without oneDNN, and
        layers an enclosing prepacked_weights already holds, and nn.Linear subclasses with their own forward.
        """
        def usable(module: nn.Module) -> bool:
            # a subclass with its own forward computes something else: it keeps it
            return (isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward
                    and "forward" not in vars(module)
                    and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32
                    and type(module.weight.data) is torch.Tensor and module.weight.numel() >= MIN_PREPACKED_WEIGHT)

        layers = [m for m in self.modules() if usable(m)] if torch.backends.mkldnn.is_available() else []
        if sum(m.weight.numel() * m.weight.element_size() for m in layers) > _available_memory() / 2:
            layers = []
        for module in layers:
            module.forward = _PrepackedLinear(module)
        try:
            yield
        finally:
            for module in layers:
                del module.forward
