"""Random checkpoints in LLaDA's and Dream's own on-disk layouts, written without a download.

A folder holds what the real ones hold, less the modeling file: config.json with the family's field names,
the weights under the family's tensor names in safetensors shards with model.safetensors.index.json, and a
tokenizer with a chat template (here a word-level one of eight words, w0 .. w7). The tests load them at a tiny shape (TINY); the
GPU check loads one at LLaDA-8B's exact shape (LLADA_8B) through the native loader and runs atpo-train on it
(benchmarks/bench_native.py), so the whole path a user takes with a real checkpoint runs at its size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# hidden size, decoder layers, attention and key/value heads, MLP width, longest sequence
TINY = dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=48, max_length=64)
LLADA_8B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, mlp=12288, max_length=4096)
LLADA_VOCAB, DREAM_VOCAB = 126464, 152064
VOCAB = {"llada": LLADA_VOCAB, "dream": DREAM_VOCAB}  # the real checkpoints' vocabularies, by family


def family_config(family: str, shape: dict = TINY) -> dict:
    """config.json of a `family` checkpoint ("llada" or "dream") of the given shape, with the real one's fields."""
    if family == "llada":
        return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": shape["hidden"],
                "n_layers": shape["layers"], "n_heads": shape["heads"], "n_kv_heads": shape["kv_heads"],
                "mlp_hidden_size": shape["mlp"], "mlp_ratio": 4, "vocab_size": LLADA_VOCAB,
                "embedding_size": LLADA_VOCAB, "max_sequence_length": shape["max_length"], "rope_theta": 500000.0,
                "rms_norm_eps": 1e-5, "mask_token_id": 126336, "eos_token_id": 2, "pad_token_id": 0,
                "weight_tying": False, "include_bias": False, "include_qkv_bias": False, "block_type": "llama",
                "activation_type": "silu", "alibi": False, "rope": True, "scale_logits": False,
                "layer_norm_type": "rms", "attention_layer_norm": False, "input_emb_norm": False, "use_cache": False}
    if family == "dream":
        return {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": shape["hidden"],
                "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
                "num_key_value_heads": shape["kv_heads"], "intermediate_size": shape["mlp"], "vocab_size": DREAM_VOCAB,
                "max_position_embeddings": shape["max_length"], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                "mask_token_id": 151666, "pad_token_id": 0, "eos_token_id": 2, "tie_word_embeddings": False,
                "use_sliding_window": False, "rope_scaling": None, "hidden_act": "silu"}
    raise ValueError(f"family must be one of {tuple(VOCAB)}, got {family!r}")


def random_weights(family: str, gen: torch.Generator, shape: dict = TINY, std: float = 0.2,
                   dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The family's tensors under its own names: matrices N(0, std^2), norms around 1, drawn on gen's device
    one tensor at a time and kept on the CPU in `dtype` (LLaDA-8B's 8.0e9 values: 16 GB in bfloat16)."""
    h, m, head_dim = shape["hidden"], shape["mlp"], shape["hidden"] // shape["heads"]
    kv = shape["kv_heads"] * head_dim
    vocab = VOCAB[family]

    def w(*size):
        return (torch.randn(*size, generator=gen, device=gen.device) * std).to(dtype).cpu()

    def norm():
        return (1 + torch.randn(h, generator=gen, device=gen.device) * 0.1).to(dtype).cpu()

    out = {}
    if family == "llada":
        out.update({"model.transformer.wte.weight": w(vocab, h), "model.transformer.ln_f.weight": norm(),
                    "model.transformer.ff_out.weight": w(vocab, h)})
        for i in range(shape["layers"]):
            p = f"model.transformer.blocks.{i}."
            out.update({p + "attn_norm.weight": norm(), p + "q_proj.weight": w(h, h), p + "k_proj.weight": w(kv, h),
                        p + "v_proj.weight": w(kv, h), p + "attn_out.weight": w(h, h), p + "ff_norm.weight": norm(),
                        p + "ff_proj.weight": w(m, h), p + "up_proj.weight": w(m, h), p + "ff_out.weight": w(h, m)})
    else:
        out.update({"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": norm(),
                    "lm_head.weight": w(vocab, h)})
        for i in range(shape["layers"]):
            p = f"model.layers.{i}."
            out.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                        p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.q_proj.bias": w(h),
                        p + "self_attn.k_proj.weight": w(kv, h), p + "self_attn.k_proj.bias": w(kv),
                        p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.v_proj.bias": w(kv),
                        p + "self_attn.o_proj.weight": w(h, h), p + "mlp.gate_proj.weight": w(m, h),
                        p + "mlp.up_proj.weight": w(m, h), p + "mlp.down_proj.weight": w(h, m)})
    return out


def write_checkpoint(folder: str | Path, family: str, gen: torch.Generator, dtype: torch.dtype = torch.float32,
                     shape: dict = TINY, shards: int = 2, std: float = 0.2, numbers: bool = False,
                     **config_changes) -> dict:
    """Write a random `family` checkpoint into folder (config.json, `shards` safetensors shards and their
    index, the tokenizer); config_changes override config.json fields. Returns its tensors by name.

    The tokenizer splits on whitespace and knows eight words, w0 .. w7 (ids 0-7; pad w0, eos w2), or with
    `numbers` every id as its own decimal word ("3 1 4" is ids 3, 1, 4; pad 0, eos 2), so that a random
    model's responses decode to numbers; its chat template wraps a prompt in ids 3 and 4, then 5."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"shards must be a positive int, got {shards!r}")
    missing = sorted(set(TINY) - set(shape))
    if missing:
        raise ValueError(f"shape lacks {missing} (it needs the keys of TINY: {sorted(TINY)})")
    folder = Path(folder)
    config = {**family_config(family, shape), **config_changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = random_weights(family, gen, shape, std, dtype)
    names = sorted(weights)
    files = {f"model-{k + 1:05d}-of-{shards:05d}.safetensors": names[k::shards] for k in range(shards)}
    for file, keys in files.items():
        save_file({k: weights[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": {k: file for file, keys in files.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    words = {str(i): i for i in range(VOCAB[family])} if numbers else {f"w{i}": i for i in range(8)}
    pad, eos, user, turn_end, assistant = ("0", "2", "3", "4", "5") if numbers else ("w0", "w2", "w3", "w4", "w5")
    tokenizer = Tokenizer(WordLevel(words, unk_token=pad))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    # an instruct checkpoint's chat template (the real ones wrap a turn in header and end tokens), in words the
    # tokenizer knows: "3 + 4" becomes ids user 3 + 4 turn_end assistant ("+" is unknown: pad)
    template = (f"{{% for message in messages %}}{user} {{{{ message['content'] }}}} {turn_end} {{% endfor %}}"
                f"{{% if add_generation_prompt %}}{assistant}{{% endif %}}")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, eos_token=eos,
                            chat_template=template).save_pretrained(folder)
    return weights
