"""LLaDA and Dream checkpoints loaded natively (no remote code) against a float64 forward written here
from the architecture: tiny random checkpoints in each family's real on-disk layout (real config
fields and tensor names, two safetensors shards and their index, a tokenizer, no modeling file;
atpo_fast.models.synthetic)."""

import json
import math

import pytest
import torch

from atpo_fast.models import load_hf_diffusion_lm
from atpo_fast.models.synthetic import TINY, write_checkpoint


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
    heads, kv_heads = TINY["heads"], TINY["kv_heads"]
    head_dim = TINY["hidden"] // heads
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    x = embed[ids]
    for i in range(TINY["layers"]):
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


@pytest.mark.parametrize("kwargs,match", [
    (dict(dtype="bf16", device="cpu"), "dtype must be torch.float32, torch.bfloat16 or torch.float16, got 'bf16'"),
    (dict(dtype=torch.int32, device="cpu"), "dtype must be .*got torch.int32"),
    (dict(dtype=torch.float32, device="tpu"), "device must be a torch device .* got 'tpu'"),
])
def test_bad_dtype_or_device_is_named(tmp_path, gen, kwargs, match):
    """Not a TypeError from Tensor.to or a RuntimeError from load_state_dict."""
    write_checkpoint(tmp_path / "llada", "llada", gen)
    with pytest.raises(ValueError, match=match):
        load_hf_diffusion_lm(str(tmp_path / "llada"), "llada", **kwargs)


@pytest.mark.parametrize("bad, message", [(dict(family="gpt2"), "family must be one of"),
                                          (dict(shards=0), "shards must be a positive int"),
                                          (dict(shape={"hidden": 8}), "shape lacks")])
def test_synthetic_checkpoint_refuses_bad_arguments_by_name(tmp_path, gen, bad, message):
    args = {"family": "llada", **bad}
    with pytest.raises(ValueError, match=message):
        write_checkpoint(tmp_path / "x", args.pop("family"), gen, **args)


def _remove_first_shard(folder):
    sorted(folder.glob("*.safetensors"))[0].unlink()


def _truncate_first_shard(folder):
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:200])


@pytest.mark.parametrize("damage, match", [
    (_remove_first_shard, "lacks model-00001-of-00002.safetensors, named by model.safetensors.index.json"),
    (_truncate_first_shard, "model-00001-of-00002.safetensors is not a readable safetensors file"),
    (lambda folder: (folder / "config.json").write_text("{not json"), "config.json is not valid JSON"),
    (lambda folder: (folder / "model.safetensors.index.json").write_text("[]"), "index.json must hold a JSON object"),
])
def test_a_damaged_checkpoint_folder_is_named(tmp_path, gen, damage, match):
    """An incomplete download or a bad edit: a ValueError naming the file, not safetensors' or json's own error."""
    write_checkpoint(tmp_path / "llada", "llada", gen)
    damage(tmp_path / "llada")
    with pytest.raises(ValueError, match=match):
        load_hf_diffusion_lm(str(tmp_path / "llada"), "llada", dtype=torch.float32, device="cpu")


def test_a_config_json_with_a_byte_order_mark_loads(tmp_path, gen):
    """Some editors save UTF-8 with a byte-order mark; json.loads refused it ("Unexpected UTF-8 BOM")."""
    write_checkpoint(tmp_path / "llada", "llada", gen)
    config = tmp_path / "llada" / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    model = load_hf_diffusion_lm(str(tmp_path / "llada"), "llada", dtype=torch.float32, device="cpu")
    assert model.backbone.config.num_hidden_layers == json.loads(config.read_text(encoding="utf-8-sig"))["n_layers"]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_prompts_are_encoded_through_the_folders_chat_template(tmp_path, gen, family):
    """An instruct checkpoint's template renders the prompt; transformers 5 hands the ids back in a dict,
    whose keys ('input_ids', 'attention_mask') were taken for the prompt's tokens."""
    write_checkpoint(tmp_path / family, family, gen)
    model = load_hf_diffusion_lm(str(tmp_path / family), family, dtype=torch.float32, device="cpu")
    assert model.encode_prompt("w1 w6") == [3, 1, 6, 4, 5]  # user w1 w6 end-of-turn assistant
    ids, mask = model.encode_prompts(["w7", "w1 w6"], "cpu")
    assert ids.tolist() == [[0, 3, 7, 4, 5], [3, 1, 6, 4, 5]] and mask.tolist() == [[0, 1, 1, 1, 1], [1] * 5]
