"""Model adapters: the tiny model, and LLaDA / Dream wiring through stand-in checkpoints loaded offline."""

import json
import shutil

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

import standin_modeling
from atpo_fast import generate
from atpo_fast.models import CharTokenizer, TinyConfig, TinyDiffusionLM, base, load_hf_diffusion_lm

SMALL = TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=48)


def test_tokenizer_round_trip():
    tok = CharTokenizer()
    text = "(12+34)*5=?\nx"
    assert tok.decode(tok.encode(text)) == text
    ids = [tok.bos_id] + tok.encode("ab") + [tok.mask_id, tok.pad_id] + tok.encode("c") + [tok.eos_id] + tok.encode("z")
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, stop_at_eos=False) == "abcz"
    with pytest.raises(ValueError, match="outside the tokenizer's alphabet"):
        tok.encode("naïve")


def _packed(module) -> bool:
    return "forward" in vars(module)


@pytest.mark.parametrize("bias", [False, True])
def test_prepacked_weights_give_f_linear_values(bias, monkeypatch):
    """Inside prepacked_weights the CPU float32 nn.Linear layers of at least MIN_PREPACKED_WEIGHT elements (the
    LM head and the decoder's larger projections) answer no-grad calls from a weight laid out once: F.linear's
    values within rounding (an odd vocabulary, odd row counts, 3-d and strided inputs); with gradients, and
    after the block, F.linear's own; a weight changed after the block is the one used; smaller layers, a nested
    block, weights that would not fit in half the available memory and an nn.Linear subclass with its own
    forward are left alone."""
    gen = torch.Generator().manual_seed(0)
    vocab = 1 << 13 | 5  # 8197 x 32: at least MIN_PREPACKED_WEIGHT elements
    model = TinyDiffusionLM(TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=8192,
                                       max_length=48, vocab_size=vocab))
    model.head = torch.nn.Linear(32, vocab, bias=bias)
    mlp = model.backbone.layers[0].mlp
    large = [model.head, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    assert all(m.weight.numel() >= base.MIN_PREPACKED_WEIGHT for m in large)
    small = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m not in large]
    assert small and all(m.weight.numel() < base.MIN_PREPACKED_WEIGHT for m in small)
    with model.prepacked_weights():
        assert all(map(_packed, large)) and not any(map(_packed, small))
        with model.prepacked_weights():  # the outer block keeps the layers
            pass
        assert all(map(_packed, large))
        for rows in (1, 7, 66):
            hidden = torch.randn(rows, 32, generator=gen)
            want = torch.nn.functional.linear(hidden.double(), model.head.weight.double(),
                                              None if model.head.bias is None else model.head.bias.double())
            with torch.no_grad():
                got = model.head_logits(hidden)
            assert got.shape == (rows, vocab) and got.dtype == torch.float32
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        strided = torch.randn(3, 11, 8192, generator=gen)[:, 2:9]
        with torch.no_grad():
            got = mlp.down_proj(strided)
        torch.testing.assert_close(got.double(), torch.nn.functional.linear(
            strided.double(), mlp.down_proj.weight.double()), rtol=1e-5, atol=1e-5)
        hidden.requires_grad_(True)
        with_grad = model.head_logits(hidden)
        assert torch.equal(with_grad, torch.nn.functional.linear(hidden, model.head.weight, model.head.bias))
    assert not any(map(_packed, large))
    with torch.no_grad():
        model.head.weight.mul_(2)
        assert torch.equal(model.head_logits(hidden), torch.nn.functional.linear(hidden, model.head.weight,
                                                                                 model.head.bias))
    monkeypatch.setattr(base, "_available_memory", lambda: 2 * sum(m.weight.numel() * 4 for m in large) - 1)
    with model.prepacked_weights():
        assert not any(map(_packed, large))
    monkeypatch.undo()

    class ScaledLinear(torch.nn.Linear):  # a subclass whose forward differs from nn.Linear's
        def forward(self, x):
            return 2 * super().forward(x)

    model.head = ScaledLinear(32, vocab, bias=bias)
    with model.prepacked_weights():
        assert not _packed(model.head) and all(map(_packed, large[1:]))


def test_generate_uses_the_prepacked_weights(monkeypatch):
    """generate() lays the linear layers out once per rollout: every step's head call sees it, and the rollout
    is the one F.linear gives (same greedy tokens, the trace within 1e-5)."""
    torch.manual_seed(0)
    model = TinyDiffusionLM(TinyConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                       max_length=48, vocab_size=1 << 13 | 5)).eval()
    seen, head = [], model.head_logits

    def spy(hidden):
        seen.append(_packed(model.head))
        return head(hidden)

    model.head_logits = spy
    prompt = torch.randint(4, 30, (3, 9))
    kwargs = dict(gen_length=12, block_length=4, steps=6)
    packed = generate(model, prompt, **kwargs)
    assert seen == [True] * 6
    monkeypatch.setattr(base, "MIN_PREPACKED_WEIGHT", 1 << 62)
    plain = generate(model, prompt, **kwargs)
    assert seen == [True] * 6 + [False] * 6
    assert torch.equal(packed.tokens, plain.tokens)
    for name in ("entropy", "margin", "surprisal"):
        torch.testing.assert_close(getattr(packed.trace, name), getattr(plain.trace, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_forward_logprobs_leave_out_mask(bias):
    """Training's log p is the sampler's: the softmax over the vocabulary without [MASK] (float64
    reference), with gradients in the head's bias too; a random model gives [MASK] ~1/V, so a softmax
    that kept it would be off by ~log(1 - 1/V)."""
    torch.manual_seed(0)
    model = TinyDiffusionLM(SMALL)
    if bias:
        model.head = torch.nn.Linear(SMALL.hidden_size, model.vocab_size, bias=True)
    ids = torch.randint(4, model.vocab_size, (2, 12))
    ids[:, 6:] = model.mask_id
    b, p = torch.tensor([0, 0, 1, 1]), torch.tensor([6, 9, 7, 11])
    targets = torch.randint(4, model.vocab_size, (4,))
    logprob = model(ids, None, b, p, targets)
    logits = model.logits(ids).double()[b, p]
    logits[:, model.mask_id] = float("-inf")
    want = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(logprob.double(), want, rtol=1e-5, atol=1e-5)
    logprob.sum().backward()
    if bias:
        assert model.head.bias.grad[model.mask_id] == 0 and model.head.bias.grad.abs().sum() > 0


def test_tiny_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = TinyDiffusionLM(SMALL).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = TinyDiffusionLM.from_pretrained(tmp_path / "ckpt").eval()
    ids = torch.randint(4, model.vocab_size, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    torch.testing.assert_close(loaded.logits(ids, mask), model.logits(ids, mask), rtol=0, atol=0)


def test_tiny_is_bidirectional():
    torch.manual_seed(0)
    model = TinyDiffusionLM(SMALL).eval()
    ids = torch.randint(4, model.vocab_size, (1, 9))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.vocab_size
    assert not torch.allclose(model.logits(ids)[0, 0], model.logits(changed)[0, 0])


def test_tiny_from_pretrained_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no config.json"):
        TinyDiffusionLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="is not a TinyDiffusionLM"):
        TinyDiffusionLM.from_pretrained(tmp_path)
    # a config field this version does not know, and weights missing or cut short: named, not a traceback
    TinyDiffusionLM(TinyConfig(hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": 2}))
    with pytest.raises(ValueError, match=r"config.json does not describe a TinyDiffusionLM: .*rope_scaling"):
        TinyDiffusionLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        TinyDiffusionLM.from_pretrained(tmp_path)
    weights.unlink()
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        TinyDiffusionLM.from_pretrained(tmp_path)


def test_tiny_rejects_unknown_attention():
    with pytest.raises(ValueError, match="attn_implementation"):
        TinyDiffusionLM(TinyConfig(attn_implementation="flash_attention_2"))


def make_checkpoint(folder, model_type: str, vocab: int, shift: bool, four_d: bool):
    """A stand-in checkpoint: config.json with the family's model_type, remote code, weights, tokenizer."""
    torch.manual_seed(0)
    config = standin_modeling.StandInConfig(vocab_size=vocab, shift_outputs=shift, expect_4d_mask=four_d)
    standin_modeling.StandInModel(config).save_pretrained(folder)
    shutil.copy(standin_modeling.__file__, folder / "standin_modeling.py")
    saved = json.loads((folder / "config.json").read_text())
    saved.update(model_type=model_type, auto_map={"AutoConfig": "standin_modeling.StandInConfig",
                                                  "AutoModel": "standin_modeling.StandInModel"})
    (folder / "config.json").write_text(json.dumps(saved))
    words = {f"w{i}": i for i in range(8)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(words, unk_token="w0")),
                                        pad_token="w0", eos_token="w2")
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llada_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("llada"), "llada", vocab=126464, shift=False, four_d=False)


@pytest.fixture(scope="module")
def dream_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dream"), "Dream", vocab=152064, shift=True, four_d=True)


def padded_batch(vocab):
    ids = torch.randint(10, 1000, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def test_llada_adapter(llada_dir):
    model = load_hf_diffusion_lm(str(llada_dir), "llada", dtype=torch.float32, device="cpu",
                                 implementation="remote").eval()
    assert (model.mask_id, model.vocab_size, model.shift, model.eos_id) == (126336, 126464, False, 2)
    ids, mask = padded_batch(model.vocab_size)
    raw = model.model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        torch.testing.assert_close(model.logits(ids, mask), raw)
        assert isinstance(model.model.get_output_embeddings(), torch.nn.Linear), "the LM head is put back"
        b, p = torch.tensor([0, 1, 1]), torch.tensor([3, 5, 9])
        torch.testing.assert_close(model.logits_at(ids, mask, b, p), raw[b, p])
        assert model.hidden_states(ids, mask).shape == (2, 10, 16)


def test_dream_adapter_shift_and_mask(dream_dir):
    model = load_hf_diffusion_lm(str(dream_dir), "dream", dtype=torch.float32, device="cpu",
                                 implementation="remote").eval()
    assert (model.mask_id, model.vocab_size, model.shift) == (151666, 152064, True)
    ids, mask = padded_batch(model.vocab_size)
    real = mask.bool()
    raw = model.model(input_ids=ids, attention_mask=real[:, None, :, None] & real[:, None, None, :],
                      position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    with torch.no_grad():
        aligned = model.logits(ids, mask)
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1])  # position i now predicts token i


def test_generate_with_a_llada_stand_in(llada_dir):
    model = load_hf_diffusion_lm(str(llada_dir), "llada", dtype=torch.float32, device="cpu",
                                 implementation="remote").eval()
    prompt, mask = padded_batch(model.vocab_size)
    rollout = generate(model, prompt, gen_length=8, block_length=4, steps=4, attention_mask=mask)
    assert (rollout.response_steps >= 0).all() and (rollout.response != model.mask_id).all()


def test_loader_errors(tmp_path, dream_dir):
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        load_hf_diffusion_lm(str(tmp_path / "missing"), "llada", device="cpu", implementation="remote")
    with pytest.raises(ValueError, match="holds no config.json"):
        load_hf_diffusion_lm(str(tmp_path), "llada", device="cpu", implementation="remote")
    with pytest.raises(ValueError, match="is not a llada model: config.json model_type is 'Dream'"):
        load_hf_diffusion_lm(str(dream_dir), "llada", device="cpu", implementation="remote")
    with pytest.raises(ValueError, match="family must be one of"):
        load_hf_diffusion_lm(str(dream_dir), "gpt", device="cpu", implementation="remote")
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the optional flash-attn"):
            load_hf_diffusion_lm(str(dream_dir), "dream", device="cpu", attn_implementation="flash_attention_2")
