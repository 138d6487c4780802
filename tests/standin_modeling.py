"""Tiny randomly initialised stand-ins for LLaDA and Dream checkpoints (remote code for AutoModel).

Copied into a temporary checkpoint folder by tests/test_models.py and loaded with
trust_remote_code, like the real models. One bidirectional mixing layer; the LM head is reached
through get/set_output_embeddings as in LLaDA and Dream. With config.shift_outputs, the raw output
at position i is the prediction for position i + 1 (Dream's convention). With config.expect_4d_mask
the model refuses 2-D masks (Dream's padded-batch convention), without it 4-D ones (LLaDA's).
"""

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput


class StandInConfig(PretrainedConfig):
    model_type = "standin"

    def __init__(self, vocab_size=64, hidden_size=16, max_position_embeddings=64, shift_outputs=False,
                 expect_4d_mask=False, initializer_range=0.5, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.shift_outputs, self.expect_4d_mask = shift_outputs, expect_4d_mask
        self.initializer_range = initializer_range
        super().__init__(**kwargs)


class StandInModel(PreTrainedModel):
    config_class = StandInConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.mix = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, module):
        self.lm_head = module

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        batch, length = input_ids.shape
        if attention_mask is not None and (attention_mask.dim() == 4) != self.config.expect_4d_mask:
            raise ValueError(f"stand-in expects a {'4' if self.config.expect_4d_mask else '2'}-d attention mask")
        if attention_mask is None:
            keys = torch.ones(batch, length, device=input_ids.device)
        elif attention_mask.dim() == 4:
            keys = attention_mask[:, 0].any(1).float()
        else:
            keys = attention_mask.float()
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(batch, -1)
        x = self.embed(input_ids) + self.position(position_ids)
        context = (x * keys[..., None]).sum(1) / keys.sum(1, keepdim=True)
        hidden = self.norm(x + torch.tanh(self.mix(context))[:, None])
        if self.config.shift_outputs:
            hidden = torch.cat([hidden[:, 1:], hidden[:, -1:]], dim=1)
        return MaskedLMOutput(logits=self.lm_head(hidden))
