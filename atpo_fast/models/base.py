"""The interface the sampler and the trainer use to drive a masked-diffusion language model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atpo_fast.ops.fused_linear_logprobs import fused_linear_logprobs


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
        if self.shift:
            hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
        return hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_index: torch.Tensor,
                positions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """float32 log p(targets[r]) [R] at the R positions (batch_index[r], positions[r]), with gradients.

        The training entry point: hidden states at the targets only, then fused_linear_logprobs
        (the [R, V] logits are never held; the LM head runs outside autocast, in its own dtype).
        Being the forward, it is what DDP and FSDP hook.
        """
        hidden = self.hidden_states(input_ids, attention_mask)[batch_index, positions]
        head = self.lm_head
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_logprobs(hidden, head.weight, targets, bias=head.bias)

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, L, V]. Prefer logits_at: it applies the LM head to the needed positions only."""
        return F.linear(self.hidden_states(input_ids, attention_mask), self.lm_head.weight, self.lm_head.bias)

    def logits_at(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_index: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] at the R positions (batch_index[r], positions[r]) only."""
        hidden = self.hidden_states(input_ids, attention_mask)[batch_index, positions]
        return F.linear(hidden, self.lm_head.weight, self.lm_head.bias)
