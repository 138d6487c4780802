"""The interface the sampler and the trainer use to drive a masked-diffusion language model."""

from __future__ import annotations

import contextlib

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
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True))
    return tokenizer.encode(text)


def decode_until_eos(tokenizer, ids: torch.Tensor, eos_id: int | None) -> str:
    """Text of a response's ids [gen_length] up to its first EOS, special tokens dropped."""
    ids = ids.tolist()
    if eos_id is not None and eos_id in ids:
        ids = ids[:ids.index(eos_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


# the smallest LM-head weight (elements) that DiffusionLM.prepacked_head lays out for oneDNN: on 2 CPU
# cores a call on the laid-out weight cost ~12 us more than F.linear at 44 x 32 and ran 0.72x its time
# at 1000 x 256 (16 rows)
MIN_PREPACKED_HEAD = 1 << 18


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
    _prepacked_head: torch.Tensor | None = None  # the LM head's weight laid out for oneDNN (prepacked_head)

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
        return F.linear(self.hidden_states(input_ids, attention_mask), self.lm_head.weight, self.lm_head.bias)

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_index: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] at the R positions (batch_index[r], positions[r]) only."""
        return self.head_logits(self.hidden_states(input_ids, attention_mask)[batch_index, positions])

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden [R, D]: logits [R, V] in hidden's dtype, F.linear's values (inside
        prepacked_head, without gradients, a CPU float32 head gives them within rounding)."""
        head = self.lm_head
        packed = self._prepacked_head
        if packed is not None and hidden.device.type == "cpu" and hidden.dtype == packed.dtype \
                and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(hidden, packed, head.bias, "none", [], "")
        return F.linear(hidden, head.weight, head.bias)

    @contextlib.contextmanager
    def prepacked_head(self):
        """Within: head_logits' no-grad calls on a CPU float32 LM head multiply by a copy of its weight
        laid out once in oneDNN's blocked format (torch.ops.mkldnn._reorder_linear_weight), instead of
        F.linear laying it out again at every call. generate() holds one for each rollout. On a 2-core
        Intel Xeon, LLaDA's 126464 x 1024 head over one block's steps (128, 124, ..., 4 rows) took
        2.37 s against 2.91 s with F.linear (same values within 3e-6). The copy costs the weight's size
        in memory, and one pass over it (0.12 s there); the weight must not change inside. Elsewhere
        (CUDA, 16-bit or small heads, a torch without oneDNN) nothing changes.
        """
        weight = self.lm_head.weight
        usable = (weight.device.type == "cpu" and weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
                  and weight.numel() >= MIN_PREPACKED_HEAD and torch.backends.mkldnn.is_available())
        outer = self._prepacked_head
        self._prepacked_head = torch.ops.mkldnn._reorder_linear_weight(weight.detach()) if usable else None
        try:
            yield
        finally:
            self._prepacked_head = outer
