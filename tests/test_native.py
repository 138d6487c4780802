"""LLaDA and Dream checkpoints loaded natively (no remote code) against a float64 forward written here
from the architecture: tiny random checkpoints in each family's real on-disk layout (real config
fields and tensor names, two safetensors shards and their index, a tokenizer, no modeling file)."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from atpo_fast.models import load_hf_diffusion_lm

SHAPE = dict(hidden=32, layers=2, heads=4, kv_heads=2, mlp=48, max_length=64)
LLADA_VOCAB, DREAM_VOCAB = 126464, 152064


def llada_config(vocab: int) -> dict:
    return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": SHAPE["hidden"],
            "n_layers": SHAPE["layers"], "n_heads": SHAPE["heads"], "n_kv_heads": SHAPE["kv_heads"],
            "mlp_hidden_size": SHAPE["mlp"], "mlp_ratio": 4, "vocab_size": vocab, "embedding_size": vocab,
            "max_sequence_length": SHAPE["max_length"], "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "mask_token_id": 126336, "eos_token_id": 2, "pad_token_id": 0, "weight_tying": False,
            "include_bias": False, "include_qkv_bias": False, "block_type": "llama", "activation_type": "silu",
            "alibi": False, "rope": True, "scale_logits": False, "layer_norm_type": "rms",
            "attention_layer_norm": False, "input_emb_norm": False, "use_cache": False}


def dream_config(vocab: int) -> dict:
    return {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": SHAPE["hidden"],
            "num_hidden_layers": SHAPE["layers"], "num_attention_heads": SHAPE["heads"],
            "num_key_value_heads": SHAPE["kv_heads"], "intermediate_size": SHAPE["mlp"], "vocab_size": vocab,
            "max_position_embeddings": SHAPE["max_length"], "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
            "mask_token_id": 151666, "pad_token_id": 0, "eos_token_id": 2, "tie_word_embeddings": False,
            "use_sliding_window": False, "rope_scaling": None, "hidden_act": "silu"}


def random_weights(family: str, vocab: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors under the family's own names (std 0.2, norms around 1)."""
    h, m, head_dim = SHAPE["hidden"], SHAPE["mlp"], SHAPE["hidden"] // SHAPE["heads"]
    kv = SHAPE["kv_heads"] * head_dim

    def w(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    def norm():
        return 1 + torch.randn(h, generator=gen) * 0.1

    out = {}
    if family == "llada":
        out.update({"model.transformer.wte.weight": w(vocab, h), "model.transformer.ln_f.weight": norm(),
                    "model.transformer.ff_out.weight": w(vocab, h)})
        for i in range(SHAPE["layers"]):
            p = f"model.transformer.blocks.{i}."
            out.update({p + "attn_norm.weight": norm(), p + "q_proj.weight": w(h, h), p + "k_proj.weight": w(kv, h),
                        p + "v_proj.weight": w(kv, h), p + "attn_out.weight": w(h, h), p + "ff_norm.weight": norm(),
                        p + "ff_proj.weight": w(m, h), p + "up_proj.weight": w(m, h), p + "ff_out.weight": w(h, m)})
    else:
        out.update({"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": norm(),
                    "lm_head.weight": w(vocab, h)})
        for i in range(SHAPE["layers"]):
            p = f"model.layers.{i}."
            out.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm(),
                        p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.q_proj.bias": w(h),
                        p + "self_attn.k_proj.weight": w(kv, h), p + "self_attn.k_proj.bias": w(kv),
                        p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.v_proj.bias": w(kv),
                        p + "self_attn.o_proj.weight": w(h, h), p + "mlp.gate_proj.weight": w(m, h),
                        p + "mlp.up_proj.weight": w(m, h), p + "mlp.down_proj.weight": w(h, m)})
    return out


def write_checkpoint(folder, family: str, gen: torch.Generator, dtype=torch.float32, **config_changes) -> dict:
    """The checkpoint folder (config.json, two shards + index, tokenizer); returns its tensors."""
    vocab = LLADA_VOCAB if family == "llada" else DREAM_VOCAB
    config = {**(llada_config(vocab) if family == "llada" else dream_config(vocab)), **config_changes}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    weights = {k: v.to(dtype) for k, v in random_weights(family, vocab, gen).items()}
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, str(folder / file), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    words = {f"w{i}": i for i in range(8)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="w0")), pad_token="w0",
                            eos_token="w2").save_pretrained(folder)
    return weights


# ----------------------------------------------------------------------------- the float64 forward


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rope(x, positions, theta):
    """Half-split rotary embedding of x [B, H, L, D] at positions [B, L]."""
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angle = positions[:, None, :, None].double() * inv_freq
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_logits(family: str, weights: dict, config: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits [B, L, V] in float64, index i predicting token i (Dream's outputs moved back by one)."""
    t = {k: v.double() for k, v in weights.items()}
    if family == "llada":
        g = lambda name: t["model.transformer." + name]  # noqa: E731
        blk = lambda i, n: g(f"blocks.{i}.{n}.weight")  # noqa: E731
        names = dict(embed="wte.weight", norm="ln_f.weight", head="ff_out.weight")
        eps, theta = config["rms_norm_eps"], config["rope_theta"]
        parts = lambda i: dict(ln1=blk(i, "attn_norm"), q=blk(i, "q_proj"), k=blk(i, "k_proj"),  # noqa: E731
                               v=blk(i, "v_proj"), o=blk(i, "attn_out"), ln2=blk(i, "ff_norm"),
                               gate=blk(i, "ff_proj"), up=blk(i, "up_proj"), down=blk(i, "ff_out"), biases=None)
        embed, final_norm, head = g(names["embed"]), g(names["norm"]), g(names["head"])
    else:
        eps, theta = config["rms_norm_eps"], config["rope_theta"]

        def parts(i):
            p = f"model.layers.{i}."
            return dict(ln1=t[p + "input_layernorm.weight"], q=t[p + "self_attn.q_proj.weight"],
                        k=t[p + "self_attn.k_proj.weight"], v=t[p + "self_attn.v_proj.weight"],
                        o=t[p + "self_attn.o_proj.weight"], ln2=t[p + "post_attention_layernorm.weight"],
                        gate=t[p + "mlp.gate_proj.weight"], up=t[p + "mlp.up_proj.weight"],
                        down=t[p + "mlp.down_proj.weight"],
                        biases=[t[p + f"self_attn.{n}_proj.bias"] for n in "qkv"])
        embed, final_norm, head = t["model.embed_tokens.weight"], t["model.norm.weight"], t["lm_head.weight"]
    batch, length = ids.shape
    heads, kv_heads = SHAPE["heads"], SHAPE["kv_heads"]
    head_dim = SHAPE["hidden"] // heads
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    x = embed[ids]
    for i in range(SHAPE["layers"]):
        w = parts(i)
        h = rms_norm(x, w["ln1"], eps)
        q, k, v = h @ w["q"].T, h @ w["k"].T, h @ w["v"].T
        if w["biases"] is not None:
            q, k, v = q + w["biases"][0], k + w["biases"][1], v + w["biases"][2]
        q = rope(q.view(batch, length, heads, head_dim).transpose(1, 2), positions, theta)
        k = rope(k.view(batch, length, kv_heads, head_dim).transpose(1, 2), positions, theta)
        v = v.view(batch, length, kv_heads, head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))  # bidirectional, real keys
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        x = x + attn @ w["o"].T
        h = rms_norm(x, w["ln2"], eps)
        x = x + (torch.nn.functional.silu(h @ w["gate"].T) * (h @ w["up"].T)) @ w["down"].T
    hidden = rms_norm(x, final_norm, eps)
    if family == "dream":
        hidden = torch.cat([hidden[:, :1], hidden[:, :-1]], dim=1)
    return hidden @ head.T


def batch(gen):
    ids = torch.randint(3, 1000, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left-padded
    ids[1, :3] = 0
    return ids, mask


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_native_logits_equal_the_float64_forward(tmp_path, gen, family):
    weights = write_checkpoint(tmp_path / family, family, gen)
    config = json.loads((tmp_path / family / "config.json").read_text())
    model = load_hf_diffusion_lm(str(tmp_path / family), family, dtype=torch.float32, device="cpu").eval()
    assert type(model).__name__ == "NativeDiffusionLM" and model.vocab_size == config["vocab_size"]
    assert model.mask_id == config["mask_token_id"] and model.shift == (family == "dream")
    ids, mask = batch(gen)
    with torch.no_grad():
        got = model.logits(ids, mask).double()
        alone = model.logits(ids[1:, 3:], None).double()
    want = reference_logits(family, weights, config, ids, mask)
    real = mask.bool()
    scale = want.abs().max()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-4 * scale)
    # a left-padded row computes what it computes alone (Dream: from its second real position on, as its
    # first real position takes the prediction made at the padding before it)
    skip = int(model.shift)
    torch.testing.assert_close(got[1, 3 + skip:], alone[0, skip:], rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_bf16_checkpoint_loads_in_bf16(tmp_path, gen, family):
    weights = write_checkpoint(tmp_path / family, family, gen, dtype=torch.bfloat16)
    config = json.loads((tmp_path / family / "config.json").read_text())
    model = load_hf_diffusion_lm(str(tmp_path / family), family, dtype=torch.bfloat16, device="cpu").eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids, mask = batch(gen)
    with torch.no_grad():
        got = model.logits(ids, mask).double()
    want = reference_logits(family, weights, config, ids, mask)
    real = mask.bool()
    error = (got[real] - want[real]).norm() / want[real].norm()
    assert error < 3e-2, error


def test_fp32_checkpoint_loads_straight_to_bf16(tmp_path, gen):
    write_checkpoint(tmp_path / "llada", "llada", gen)
    model = load_hf_diffusion_lm(str(tmp_path / "llada"), "llada", dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(b.is_meta for b in model.buffers()) and not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("family,change,field", [
    ("llada", {"weight_tying": True}, "weight_tying"),
    ("llada", {"include_qkv_bias": True}, "include_qkv_bias"),
    ("llada", {"alibi": True, "rope": False}, "alibi"),
    ("llada", {"block_type": "sequential"}, "block_type"),
    ("llada", {"scale_logits": True}, "scale_logits"),
    ("dream", {"tie_word_embeddings": True}, "tie_word_embeddings"),
    ("dream", {"use_sliding_window": True}, "use_sliding_window"),
])
def test_unsupported_configs_are_refused_by_name(tmp_path, gen, family, change, field):
    write_checkpoint(tmp_path / family, family, gen, **change)
    with pytest.raises(ValueError, match=f"{field}=.*implementation='remote'"):
        load_hf_diffusion_lm(str(tmp_path / family), family, dtype=torch.float32, device="cpu")


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path, gen):
    write_checkpoint(tmp_path / "llada", "llada", gen, n_layers=3)  # config says 3 blocks, the shards hold 2
    with pytest.raises(ValueError, match="does not match its config.json: missing"):
        load_hf_diffusion_lm(str(tmp_path / "llada"), "llada", dtype=torch.float32, device="cpu")


def test_unknown_implementation(tmp_path, gen):
    write_checkpoint(tmp_path / "llada", "llada", gen)
    with pytest.raises(ValueError, match="implementation must be one of"):
        load_hf_diffusion_lm(str(tmp_path / "llada"), "llada", dtype=torch.float32, device="cpu",
                             implementation="jax")
