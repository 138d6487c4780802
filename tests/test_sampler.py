"""The sampler against an independent reimplementation of LLaDA's reference generate, and its trace."""

import copy

import pytest
import torch

from atpo_fast import generate, step_stats, token_stats
from atpo_fast.models import TinyConfig, TinyDiffusionLM, load_hf_diffusion_lm
from atpo_fast.models.synthetic import write_checkpoint
from atpo_fast.reference import llada_generate
from atpo_fast.sampler import transfer_schedule
from atpo_fast.trace import concat_rollouts
from conftest import DEVICE

PROMPTS = ["12+34=", "7*8=", "(3+4)*5=", "1"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(1234)
    return TinyDiffusionLM(TinyConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                                      max_length=64)).eval()


def _double(model, cls=TinyDiffusionLM):
    """A float64 copy: argmax and top-k decisions cannot flip on rounding between two code paths."""
    copy = cls(model.config)
    copy.load_state_dict(model.state_dict())
    return copy.double().eval()


@pytest.fixture(scope="module")
def model64(model):
    return _double(model)


def left_padded(tokenizer, prompts):
    ids = [tokenizer.encode(p) for p in prompts]
    width = max(map(len, ids))
    prompt = torch.tensor([[tokenizer.pad_id] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    return prompt, mask


@pytest.mark.parametrize("gen_length,block_length,steps", [(16, 8, 8), (24, 8, 12), (12, 12, 5), (16, 4, 16),
                                                           (8, 4, 12)])
def test_matches_llada_reference(model64, gen_length, block_length, steps):
    prompt, mask = left_padded(model64.tokenizer, PROMPTS)
    rollout = generate(model64, prompt, gen_length=gen_length, block_length=block_length, steps=steps,
                       attention_mask=mask, backend="torch")
    assert torch.equal(rollout.tokens, llada_generate(model64, prompt, gen_length, block_length, steps, mask))


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_padding_does_not_change_the_answer(model64, cache):
    prompt, mask = left_padded(model64.tokenizer, PROMPTS)
    batch = generate(model64, prompt, gen_length=12, block_length=4, steps=6, attention_mask=mask, cache=cache)
    for row, text in enumerate(PROMPTS):
        alone = torch.tensor([model64.tokenizer.encode(text)])
        single = generate(model64, alone, gen_length=12, block_length=4, steps=6, cache=cache)
        assert torch.equal(single.response[0], batch.response[row])


@pytest.mark.parametrize("steps", [8, 16, 24])
def test_step_map_and_schedule(model, steps):
    prompt, mask = left_padded(model.tokenizer, PROMPTS)
    gen_length, block_length = 16, 8
    rollout = generate(model, prompt, gen_length=gen_length, block_length=block_length, steps=steps,
                       attention_mask=mask, temperature=1.0, seed=0)
    assert (rollout.response_steps >= 0).all(), "every response position is committed"
    assert (rollout.step_map[:, :rollout.prompt_length] == -1).all(), "step_map is -1 on the prompt"
    per_block = steps // (gen_length // block_length)
    schedule = transfer_schedule(torch.full((len(PROMPTS),), block_length), per_block)
    expected = schedule[:, schedule.sum(0) > 0].repeat(1, gen_length // block_length)  # empty steps are skipped
    assert rollout.trace.num_steps == expected.shape[1] == min(steps, gen_length)
    counts = torch.stack([(rollout.step_map == t).sum(1) for t in range(rollout.trace.num_steps)], 1)
    assert torch.equal(counts, rollout.trace.count)
    assert torch.equal(counts, expected)
    # positions of block j are committed during block j's steps only
    block_of_step = rollout.trace.block
    block_of_position = torch.arange(gen_length) // block_length
    steps_of = rollout.response_steps
    assert torch.equal(block_of_step[steps_of], block_of_position.expand_as(steps_of))


def test_transfer_schedule():
    got = transfer_schedule(torch.tensor([8, 7, 3, 0]), 3)
    assert torch.equal(got, torch.tensor([[3, 3, 2], [3, 2, 2], [1, 1, 1], [0, 0, 0]]))


def replay(model, rollout, t):
    """The state before step t, and the masks of tokens committed at t and of the block's candidates."""
    response = rollout.response.clone()
    before = rollout.response_steps >= t
    response[before] = model.mask_id
    tokens = torch.cat([rollout.tokens[:, :rollout.prompt_length], response], 1)
    block = int(rollout.trace.block[t])
    block_length = rollout.response_steps.shape[1] // (int(rollout.trace.block.max()) + 1)
    in_block = (torch.arange(response.shape[1]) // block_length) == block
    return tokens, rollout.response_steps == t, before & in_block


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
def test_trace_equals_step_stats_from_full_logits(model, remasking):
    prompt, mask = left_padded(model.tokenizer, PROMPTS)
    rollout = generate(model, prompt, gen_length=16, block_length=8, steps=8, attention_mask=mask,
                       temperature=0.7, remasking=remasking, seed=3)
    prev = None
    for t in range(rollout.trace.num_steps):
        tokens, committed, candidates = replay(model, rollout, t)
        logits = model.logits(tokens, rollout.attention_mask)[:, rollout.prompt_length:]
        logits[..., model.mask_id] = float("-inf")  # as the sampler does
        stats = token_stats(logits)
        want = step_stats(stats, committed, prev_entropy=prev)
        want_candidates = step_stats(stats, candidates)
        prev = want.entropy
        logp = logits.double().log_softmax(-1).gather(-1, rollout.response[..., None]).squeeze(-1)
        surprisal = (torch.where(committed, -logp, 0.0).sum(1) / committed.sum(1)).float()  # NaN: nothing committed
        for name, got, ref in (("entropy", rollout.trace.entropy[:, t], want.entropy),
                               ("margin", rollout.trace.margin[:, t], want.margin),
                               ("roec", rollout.trace.roec[:, t], want.roec),
                               ("surprisal", rollout.trace.surprisal[:, t], surprisal),
                               ("candidate_entropy", rollout.trace.candidate_entropy[:, t], want_candidates.entropy),
                               ("candidate_margin", rollout.trace.candidate_margin[:, t], want_candidates.margin)):
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5, equal_nan=True, msg=f"{name} at step {t}")
        assert torch.equal(rollout.trace.count[:, t], want.count)


def test_threshold_mode(model):
    prompt, mask = left_padded(model.tokenizer, PROMPTS)
    threshold = 0.05
    rollout = generate(model, prompt, gen_length=16, block_length=8, steps=8, attention_mask=mask,
                       threshold=threshold)
    assert (rollout.response_steps >= 0).all()
    trace = rollout.trace
    assert trace.num_steps <= 16
    for t in range(trace.num_steps):
        tokens, committed, candidates = replay(model, rollout, t)
        active = candidates.any(1)
        assert (trace.count[active, t] >= 1).all(), "at least one commit per step while the block has candidates"
        logits = model.logits(tokens, rollout.attention_mask)[:, rollout.prompt_length:]
        logits[..., model.mask_id] = float("-inf")
        probs = token_stats(logits).sampled_prob
        below = (committed & (probs < threshold)).sum(1)
        assert (below <= 1).all(), "only the one forced commit may fall below the threshold"
        top = torch.where(candidates, probs, -1.0).max(1).values
        assert ((probs >= threshold) & candidates).sum(1).eq(committed.sum(1))[top >= threshold].all()


def test_seeds_reproduce(model):
    prompt, mask = left_padded(model.tokenizer, PROMPTS)
    kwargs = dict(gen_length=16, block_length=8, steps=8, attention_mask=mask, temperature=1.0, remasking="random")
    a = generate(model, prompt, seed=11, **kwargs)
    b = generate(model, prompt, seed=11, **kwargs)
    c = generate(model, prompt, seed=12, **kwargs)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step_map, b.step_map)
    assert not (torch.equal(a.tokens, c.tokens) and torch.equal(a.step_map, c.step_map))


class ShiftedTiny(TinyDiffusionLM):
    """A Dream-style stand-in: its raw output at position i is the prediction for position i + 1."""

    shift = True

    def _hidden_states(self, input_ids, attention_mask):
        hidden = super()._hidden_states(input_ids, attention_mask)
        return torch.cat([hidden[:, 1:], hidden[:, -1:]], dim=1)


def test_dream_style_shift(model64):
    shifted = _double(model64, ShiftedTiny)
    prompt, mask = left_padded(model64.tokenizer, PROMPTS)
    kwargs = dict(gen_length=12, block_length=4, steps=6, attention_mask=mask)
    assert torch.equal(generate(shifted, prompt, **kwargs).tokens, generate(model64, prompt, **kwargs).tokens)


def test_triton_backend_matches_torch(model):
    """Greedy rollouts on the test device (the Triton kernels run compiled on CUDA, interpreted on CPU)."""
    prompt, mask = left_padded(model.tokenizer, PROMPTS[:2])
    on_device = copy.deepcopy(model).to(DEVICE)
    kwargs = dict(gen_length=8, block_length=4, steps=4, attention_mask=mask.to(DEVICE))
    a = generate(on_device, prompt.to(DEVICE), backend="torch", **kwargs)
    b = generate(on_device, prompt.to(DEVICE), backend="triton", **kwargs)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step_map, b.step_map)
    torch.testing.assert_close(a.trace.entropy, b.trace.entropy, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_eos_fill(model):
    eos_model = _double(model)
    with torch.no_grad():
        eos_model.head.weight[eos_model.eos_id] *= 0
        eos_model.head.weight[eos_model.eos_id, 0] = 50.0  # EOS now wins wherever that feature is positive
    prompt, mask = left_padded(model.tokenizer, PROMPTS)
    kwargs = dict(gen_length=16, block_length=4, steps=16, attention_mask=mask)
    plain = generate(eos_model, prompt, **kwargs)
    filled = generate(eos_model, prompt, eos_fill=True, **kwargs)
    assert (filled.response_steps >= 0).all()
    trace = filled.trace
    assert int(trace.count.sum() + trace.filled.sum()) == filled.response_steps.numel()
    eos = filled.response == eos_model.eos_id
    steps = filled.response_steps
    for row in range(len(PROMPTS)):
        for q in eos[row].nonzero().flatten().tolist():
            # every position after an EOS and committed at a later step than it is an EOS
            later = (torch.arange(steps.shape[1]) > q) & (steps[row] > steps[row, q])
            assert eos[row, later].all()
    # filled positions carry the step of their fill: each filled count shows up in step_map
    for t in range(trace.num_steps):
        assert int((steps == t).sum()) == int(trace.count[:, t].sum() + trace.filled[:, t].sum())
    assert trace.filled.sum() > 0, "the test model should have produced an EOS to fill after"
    assert trace.num_steps <= plain.trace.num_steps


@pytest.mark.parametrize("kwargs,match", [
    (dict(gen_length=10, block_length=4, steps=4), "gen_length .* must be a multiple of block_length"),
    (dict(gen_length=16, block_length=4, steps=6), r"steps \(6\) must be divisible by the number of blocks \(4\)"),
    (dict(gen_length=60, block_length=4, steps=15), "exceeds the model's context"),
    (dict(gen_length=8, block_length=4, steps=4, remasking="top"), "remasking must be one of"),
    (dict(gen_length=8, block_length=4, steps=4, threshold=1.5), r"threshold must lie in \(0, 1\]"),
    (dict(gen_length=8, block_length=4, steps=4, remasking="random", threshold=0.5), "threshold works with"),
    (dict(gen_length=8, block_length=4, steps=4, temperature=-1.0), "temperature"),
    (dict(gen_length=0, block_length=4, steps=4), "gen_length must be a positive int"),
])
def test_bad_arguments(model, kwargs, match):
    prompt = torch.tensor([model.tokenizer.encode("12+34=")])
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, **kwargs)


@pytest.mark.parametrize("mask,match", [
    ([[1, 1, 1, 0], [1, 1, 1, 1]], "attention_mask must be left-padded"),  # right padding: Dream would read a pad's prediction
    ([[0, 1, 2, 2], [1, 1, 1, 1]], "attention_mask must hold only 0"),  # a 2 would count its position twice
    ([[0, 0.5, 1, 1], [1, 1, 1, 1]], "attention_mask must hold only 0"),
    ([[0, 0, 0, 0], [1, 1, 1, 1]], "attention_mask has a row without a real token"),
    ([[1, 1, 1, 1]], "attention_mask must be a tensor of prompt_ids' shape"),
])
def test_attention_masks_that_are_not_left_padding_are_an_error(model, mask, match):
    prompt = torch.tensor([model.tokenizer.encode("1+2=")] * 2)
    with pytest.raises(ValueError, match=match):
        generate(model, prompt, gen_length=8, block_length=4, steps=4, attention_mask=torch.tensor(mask))


def test_right_padding_changes_a_shifted_models_logits(tmp_path, gen):
    """Why generate refuses right padding: the pad before the response predicts Dream's first response token."""
    write_checkpoint(tmp_path, "dream", gen)
    dream = load_hf_diffusion_lm(str(tmp_path), "dream", dtype=torch.float32, device="cpu")
    prompt, response = torch.randint(5, 60, (1, 4), generator=gen), torch.full((1, 4), dream.mask_id)
    alone = dream.logits(torch.cat([prompt, response], 1), None)[:, 4:]
    right = dream.logits(torch.cat([prompt, torch.full((1, 2), dream.pad_id), response], 1),
                         torch.tensor([[1, 1, 1, 1, 0, 0, 1, 1, 1, 1]]))[:, 6:]
    left = dream.logits(torch.cat([torch.full((1, 2), dream.pad_id), prompt, response], 1),
                        torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1]]))[:, 6:]
    torch.testing.assert_close(left, alone, rtol=1e-5, atol=1e-5)
    assert (right[:, 0] - alone[:, 0]).abs().max() > 1e-2


@pytest.mark.parametrize("seed", [-1, 1.5, True, 2**64])
def test_bad_seeds_are_named(model, seed):
    prompt = torch.tensor([model.tokenizer.encode("1+2=")])
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\)"):
        generate(model, prompt, gen_length=8, block_length=4, steps=4, temperature=1.0, seed=seed)


@pytest.mark.parametrize("shift", [-100, 10**6])
def test_prompt_ids_outside_the_vocabulary_are_an_error(model, shift):
    """Not an embedding's IndexError (a device-side assert on CUDA)."""
    prompt = torch.tensor([model.tokenizer.encode("12+34=")]) + shift
    with pytest.raises(ValueError, match=rf"prompt_ids must lie in \[0, {model.vocab_size}\)"):
        generate(model, prompt, gen_length=8, block_length=4, steps=4)


def test_concat_rollouts_repads_prompts_and_widens_traces(model):
    """Rollouts of separate generate calls joined into one batch: the trainer's prompts_per_call."""
    parts = []
    for prompts, gen, steps in ((PROMPTS[:2], 8, 8), (PROMPTS[2:], 8, 4)):
        prompt, mask = left_padded(model.tokenizer, prompts)
        parts.append(generate(model, prompt, gen_length=gen, block_length=8, steps=steps, attention_mask=mask))
    joined = concat_rollouts(parts, model.pad_id)
    width = max(p.prompt_length for p in parts)
    assert joined.prompt_length == width and joined.trace.num_steps == 8
    row = 0
    for part in parts:
        for i in range(part.tokens.shape[0]):
            pad = width - part.prompt_length
            assert torch.equal(joined.tokens[row, pad:], part.tokens[i])
            assert (joined.tokens[row, :pad] == model.pad_id).all() and (joined.attention_mask[row, :pad] == 0).all()
            assert torch.equal(joined.step_map[row, pad:], part.step_map[i])
            assert (joined.step_map[row, :pad] == -1).all()
            steps = part.trace.num_steps
            assert torch.equal(joined.trace.count[row, :steps], part.trace.count[i])
            assert (joined.trace.count[row, steps:] == 0).all() and joined.trace.entropy[row, steps:].isnan().all()
            row += 1


def test_nan_logits_are_an_error(model):
    broken = _double(model)
    with torch.no_grad():
        broken.head.weight[5] = float("nan")  # every row's logits hold a NaN
    prompt = torch.tensor([model.tokenizer.encode("12+34=")])
    with pytest.raises(RuntimeError, match="NaN or infinite logits"):
        generate(broken, prompt, gen_length=8, block_length=4, steps=4)


def test_commit_logprob_is_the_committed_tokens_logprob(model):
    """Rollout.commit_logprob: log p of each committed token at the state before its step, over the
    vocabulary without [MASK] (what the sampler drew from); NaN on the prompt."""
    prompt, mask = left_padded(model.tokenizer, PROMPTS)
    rollout = generate(model, prompt, gen_length=8, block_length=4, steps=8, attention_mask=mask, temperature=1.0,
                       seed=0)
    start = rollout.prompt_length
    assert rollout.commit_logprob[:, :start].isnan().all() and not rollout.commit_logprob[:, start:].isnan().any()
    for t in range(rollout.trace.num_steps):
        tokens, committed, _ = replay(model, rollout, t)
        with torch.no_grad():
            logits = model.logits(tokens, rollout.attention_mask)[:, start:]
        logits[..., model.mask_id] = float("-inf")
        want = logits.log_softmax(-1).gather(-1, rollout.response[..., None]).squeeze(-1)
        torch.testing.assert_close(rollout.commit_logprob[:, start:][committed], want[committed], rtol=0, atol=1e-5)
