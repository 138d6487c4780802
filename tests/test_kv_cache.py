"""Block KV caches (generate's cache="prefix" / "dual"): a cached forward over the block's queries
equals the full forward on the state the cache was made from, for a left-padded batch, on the tiny
model and on native LLaDA and Dream checkpoints; a rollout with one step per block is the exact one."""

import pytest
import torch
from transformers import DynamicCache

from atpo_fast import generate
from atpo_fast.models import TinyConfig, TinyDiffusionLM, load_hf_diffusion_lm
from atpo_fast.models.kv_cache import BlockCache, _last_layer_output_at_rows, _RowsLayer
from atpo_fast.models.synthetic import write_checkpoint

TINY = TinyConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, max_length=64)


def models(tmp_path, gen, dtype=torch.float32):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    yield "tiny", TinyDiffusionLM(TINY).to(dtype).eval()
    for family in ("llada", "dream"):
        write_checkpoint(tmp_path / family, family, gen)
        yield family, load_hf_diffusion_lm(str(tmp_path / family), family, dtype=dtype, device="cpu").eval()


def padded_state(model, gen, prompt=6, gen_length=12):
    """Three left-padded rows: prompt, a committed first block, the active block and masks after it."""
    batch = 3
    tokens = torch.randint(5, 60, (batch, prompt + gen_length), generator=gen)
    mask = torch.ones_like(tokens)
    mask[1, :2], mask[2, :4] = 0, 0
    tokens[mask == 0] = model.pad_id
    tokens[:, prompt + 4:] = model.mask_id  # block [prompt + 4, prompt + 8) active, the rest still masked
    tokens[0, prompt + 5] = 7  # a row that already committed a token of the block
    return tokens, mask, slice(prompt + 4, prompt + 8)


# bfloat16, the dtype of GPU runs: a CPU bf16 nn.Linear with a bias (Dream's q/k/v) rounds a row differently
# with the number of rows it is given, and a step or a block start's last layer takes fewer rows than the full
# forward; in 20 seeds Dream's logits then differed by up to 0.9% of their largest (1-2 bf16 steps), the
# others' not at all (a wrong cache is off by the logits' own size)
@pytest.mark.parametrize("dtype, first_tol, tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 2e-2, 2e-2)],
                         ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_forward_equals_the_full_forward(tmp_path, gen, mode, dtype, first_tol, tol):
    for name, model in models(tmp_path, gen, dtype):
        tokens, mask, window = padded_state(model, gen)
        rows, cols = (tokens[:, window] == model.mask_id).nonzero(as_tuple=True)
        cols = cols + window.start
        with torch.no_grad():
            want = model.logits_at(tokens, mask, rows, cols)
            cache = BlockCache(model, tokens, mask, window, mode)
            first = cache.logits_at(tokens, rows, cols)  # from the full forward
            again = cache.logits_at(tokens, rows, cols)  # from the cached keys and values
        assert want.dtype == first.dtype == again.dtype == dtype
        scale = want.float().abs().max().item()
        torch.testing.assert_close(first, want, rtol=0, atol=first_tol * scale, msg=name)
        torch.testing.assert_close(again, want, rtol=0, atol=tol * scale, msg=f"{name} {mode}")


def test_one_step_per_block_is_exact(tmp_path, gen):
    """With one step per block only the cache's full forward is used: the rollout is the exact one."""
    for name, model in models(tmp_path, gen):
        prompt = torch.randint(5, 60, (2, 5), generator=gen)
        mask = torch.ones_like(prompt)
        mask[1, :2] = 0
        kwargs = dict(gen_length=8, block_length=4, steps=2, attention_mask=mask, temperature=1.0, seed=3)
        exact = generate(model, prompt, **kwargs)
        for mode in ("prefix", "dual"):
            cached = generate(model, prompt, cache=mode, **kwargs)
            assert torch.equal(cached.tokens, exact.tokens) and torch.equal(cached.step_map, exact.step_map), name


def test_cached_rollouts_complete(tmp_path, gen):
    model = TinyDiffusionLM(TINY).eval()
    prompt = torch.randint(5, 60, (3, 5), generator=gen)
    for mode in ("prefix", "dual"):
        rollout = generate(model, prompt, gen_length=8, block_length=4, steps=8, temperature=1.0, seed=1, cache=mode)
        assert (rollout.response_steps >= 0).all() and (rollout.response != model.mask_id).all()
        assert rollout.trace.num_steps == 8


def test_bad_cache_arguments(tmp_path, gen):
    model = TinyDiffusionLM(TINY).eval()
    prompt = torch.randint(5, 60, (1, 5), generator=gen)
    with pytest.raises(ValueError, match="cache must be one of"):
        generate(model, prompt, gen_length=4, block_length=4, steps=4, cache="full")
    from test_models import make_checkpoint

    remote = load_hf_diffusion_lm(str(make_checkpoint(tmp_path / "standin", "llada", vocab=200, shift=False,
                                                      four_d=False)), "llada", device="cpu", implementation="remote")
    with pytest.raises(ValueError, match="KV cache needs a model with a transformers backbone"):
        generate(remote, torch.tensor([[5, 6]]), gen_length=4, block_length=4, steps=4, cache="prefix")


def test_refreshing_every_step_is_the_exact_sampler(gen):
    """cache_refresh=1: a full forward at every step, so tokens (greedy) and trace equal cache="none"."""
    model = TinyDiffusionLM(TINY).eval()
    prompt = torch.randint(5, 60, (3, 5), generator=gen)
    mask = torch.ones_like(prompt)
    mask[2, :3] = 0
    kwargs = dict(gen_length=12, block_length=4, steps=12, attention_mask=mask)
    exact = generate(model, prompt, **kwargs)
    for mode in ("prefix", "dual"):
        fresh = generate(model, prompt, cache=mode, cache_refresh=1, **kwargs)
        assert torch.equal(fresh.tokens, exact.tokens) and torch.equal(fresh.step_map, exact.step_map)
        for field in ("entropy", "margin", "roec", "candidate_entropy", "candidate_margin"):
            torch.testing.assert_close(getattr(fresh.trace, field), getattr(exact.trace, field), rtol=0, atol=1e-5,
                                       equal_nan=True)
        stale = generate(model, prompt, cache=mode, cache_refresh=2, **kwargs)
        assert (stale.response_steps >= 0).all()
    with pytest.raises(ValueError, match="cache_refresh must be a positive int"):
        generate(model, prompt, cache="dual", cache_refresh=0, **kwargs)


def test_steps_and_block_starts_trim_the_last_layer_unless_fsdp_shards_it():
    """A block start's and a prefix step's last layer return the block's rows only (the cache tests above check
    their values); dual reads every query, and a layer sharded by FSDP2 must run its own forward (it gathers
    its weights)."""
    backbone = TinyDiffusionLM(TINY).eval().backbone
    last = backbone.layers[-1]
    for rows in (slice(0, 2), slice(3, 5), slice(1, 4)):
        with _last_layer_output_at_rows(backbone, rows, 5, DynamicCache()):
            assert isinstance(backbone.layers[-1], _RowsLayer) and backbone.layers[-1].layer is last
        assert backbone.layers[-1] is last
    with _last_layer_output_at_rows(backbone, slice(0, 5), 5, DynamicCache()):  # dual: every query is read
        assert backbone.layers[-1] is last
    last.unshard = lambda: None  # what fully_shard gives a module
    with _last_layer_output_at_rows(backbone, slice(3, 5), 5, DynamicCache()):
        assert backbone.layers[-1] is last
