"""selected_logprobs and fused_linear_logprobs: values and gradients against float64 references.

float32 results (and the float32 log-probs of low-precision logits): within 1e-5 relative. A bf16/fp16
gradient of selected_logprobs: elementwise, the float64 value rounded once (half an ulp). Gradients
of fused_linear_logprobs in bf16/fp16 go through low-precision matmuls: the relative error (Frobenius
norm) at most torch's own low-precision computation's plus 1e-4.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from atpo_fast import fused_linear_logprobs, reference, selected_logprobs
from conftest import DEVICE

LOW = (torch.bfloat16, torch.float16)
fll = importlib.import_module("atpo_fast.ops.fused_linear_logprobs")  # the module, not the function


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_fp32_close(x, ref, msg=""):
    scale = ref.abs().max().item()
    torch.testing.assert_close(x.double(), ref, rtol=1e-5, atol=1e-5 * scale + 1e-9, equal_nan=True, msg=msg)


def assert_rounded_once(x: torch.Tensor, ref: torch.Tensor, msg: str = "") -> None:
    """x (bf16/fp16) is ref (float64) computed in float32 and rounded once to nearest: within half a
    unit in the last place of ref, plus float32 arithmetic error (a few float32 ulps of the largest |ref|)."""
    finfo = torch.finfo(x.dtype)
    exponent = torch.frexp(ref)[1].double() - 1  # |ref| in [2^e, 2^(e+1))
    ulp = (torch.exp2(exponent) * finfo.eps).clamp_min(finfo.smallest_normal * finfo.eps)
    fp32_error = 8 * torch.finfo(torch.float32).eps * ref.abs().max()
    excess = (x.double() - ref).abs() - (0.5 * ulp + fp32_error)
    worst = int(excess.argmax())
    assert excess.max() <= 0, (f"{msg}: {x.flatten()[worst].item()!r} vs float64 {ref.flatten()[worst].item()!r}, "
                               f"more than half an ulp ({ulp.flatten()[worst].item():.3g}) apart")


def random_targets(n, vocab, gen, ignored=0.2):
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[torch.rand(n, generator=gen) < ignored] = -100
    return targets


# ---------------------------------------------------------------- selected_logprobs

def logits_and_targets(n, vocab, gen, neg_inf=True):
    logits = torch.randn(n, vocab, generator=gen) * 3
    targets = random_targets(n, vocab, gen)
    if neg_inf:
        hole = torch.rand(n, vocab, generator=gen) < 0.1
        hole[torch.arange(n), targets.clamp_min(0)] = False  # keep targets finite
        logits[hole] = float("-inf")
    return logits, targets


def run_selected(logits, targets, temperature, backend, weights):
    x = logits.detach().clone().requires_grad_()
    logp = selected_logprobs(x, targets, temperature=temperature, backend=backend)
    (logp * weights).sum().backward()
    return logp.detach(), x.grad


def reference_selected(logits, targets, temperature, weights):
    x = logits.detach().double().requires_grad_()
    logp = reference.selected_logprobs(x, targets, temperature)
    (logp * weights.double()).sum().backward()
    return logp.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab,temperature", [(41, 1.0), (1000, 0.7), (1000, 1.6)])
def test_selected_matches_reference(backend, gen, dtype, vocab, temperature):
    logits, targets = logits_and_targets(13, vocab, gen)
    logits = logits.to(dtype)
    weights = torch.randn(13, generator=gen)
    logp, grad = run_selected(logits.to(DEVICE), targets.to(DEVICE), temperature, backend, weights.to(DEVICE))
    ref_logp, ref_grad = reference_selected(logits, targets, temperature, weights)
    assert logp.dtype == torch.float32 and grad.dtype == dtype
    assert torch.equal(logp.cpu()[targets == -100], torch.zeros(int((targets == -100).sum())))
    assert (grad.cpu()[targets == -100] == 0).all()
    # the log-probs are float32 from the logits as given; a low-precision gradient is rounded once
    assert_fp32_close(logp.cpu(), ref_logp, "logprob")
    if dtype == torch.float32:
        assert_fp32_close(grad.cpu(), ref_grad, "grad")
    else:
        assert_rounded_once(grad.cpu(), ref_grad, "grad")


def test_selected_real_vocab(backend, gen):
    logits, targets = logits_and_targets(2, 126464, gen)
    targets[1] = 126463
    weights = torch.randn(2, generator=gen)
    logp, grad = run_selected(logits.to(DEVICE), targets.to(DEVICE), 1.0, backend, weights.to(DEVICE))
    ref_logp, ref_grad = reference_selected(logits, targets, 1.0, weights)
    assert_fp32_close(logp.cpu(), ref_logp)
    assert_fp32_close(grad.cpu(), ref_grad)


def test_selected_strided_and_leading_shape(backend, gen):
    base = torch.randn(5, 3, 60, generator=gen)
    for logits in (base[..., 4:51], base[..., :47].transpose(0, 1)):
        targets = torch.randint(0, 47, logits.shape[:-1], generator=gen)
        weights = torch.randn(logits.shape[:-1], generator=gen)
        logp, grad = run_selected(logits.to(DEVICE), targets.to(DEVICE), 0.9, backend, weights.to(DEVICE))
        ref_logp, ref_grad = reference_selected(logits, targets, 0.9, weights)
        assert logp.shape == logits.shape[:-1] and grad.shape == logits.shape
        assert_fp32_close(logp.cpu(), ref_logp)
        assert_fp32_close(grad.cpu(), ref_grad)


def test_selected_expanded_grad_output(backend, gen):
    """An upstream gradient with stride 0 (from .sum()) must be read per row."""
    logits, targets = logits_and_targets(6, 30, gen, neg_inf=False)
    x = logits.to(DEVICE).requires_grad_()
    selected_logprobs(x, targets.to(DEVICE), backend=backend).sum().backward()
    _, ref_grad = reference_selected(logits, targets, 1.0, torch.ones(6))
    assert_fp32_close(x.grad.cpu(), ref_grad)


def test_selected_ignored_rows_with_garbage(backend, gen):
    """Ignored rows (-100) give 0 and an exactly-zero gradient even when their logits are NaN padding."""
    logits, targets = logits_and_targets(6, 30, gen, neg_inf=False)
    targets[[1, 4]] = -100
    logits[1] = float("nan")
    logits[4, 3] = float("inf")
    x = logits.to(DEVICE).requires_grad_()
    logp = selected_logprobs(x, targets.to(DEVICE), backend=backend)
    logp.sum().backward()
    assert (logp.detach().cpu()[[1, 4]] == 0).all() and (x.grad.cpu()[[1, 4]] == 0).all()
    keep = torch.tensor([0, 2, 3, 5])
    _, ref_grad = reference_selected(logits[keep], targets[keep], 1.0, torch.ones(4))
    assert_fp32_close(x.grad.cpu()[keep], ref_grad)


def test_selected_entropy(backend, gen):
    logits, targets = logits_and_targets(9, 200, gen)
    logp, entropy = selected_logprobs(logits.to(DEVICE), targets.to(DEVICE), temperature=0.8, return_entropy=True,
                                      backend=backend)
    assert not entropy.requires_grad
    ref = reference.token_stats(logits / 0.8)["entropy"]
    assert_fp32_close(entropy.cpu(), ref)


def test_selected_gradcheck_double(gen):
    logits, targets = logits_and_targets(4, 7, gen, neg_inf=False)
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: selected_logprobs(z, targets, temperature=0.7, backend="torch"), (x,), eps=1e-6, atol=1e-7)


def test_selected_compiles(backend, gen):
    logits, targets = logits_and_targets(5, 33, gen, neg_inf=False)
    x = logits.to(DEVICE).requires_grad_()

    def loss(z):
        return (selected_logprobs(z, targets.to(DEVICE), backend=backend) ** 2).sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    value = compiled(x)
    value.backward()
    grad = x.grad.clone()
    x.grad = None
    loss(x).backward()
    torch.testing.assert_close(value, loss(x))
    torch.testing.assert_close(grad, x.grad)


@pytest.mark.parametrize("args,kwargs,match", [
    ((torch.zeros(3, 5, dtype=torch.int32), torch.zeros(3, dtype=torch.int64)), {}, "logits must be float32"),
    ((torch.zeros(3, 5), torch.zeros(4, dtype=torch.int64)), {}, "targets must have shape"),
    ((torch.zeros(3, 5), torch.zeros(3)), {}, "targets must be int64"),
    ((torch.zeros(3, 5), torch.tensor([0, 5, 1])), {}, r"targets must lie in \[0, 5\) or -100"),
    ((torch.zeros(3, 5), torch.tensor([0, -1, 1])), {}, "targets must lie in"),
    ((torch.zeros(3, 5), torch.zeros(3, dtype=torch.int64)), dict(temperature=0.0),
     "temperature must be finite and > 0"),
    ((torch.zeros(3, 5, dtype=torch.float64, device=DEVICE), torch.zeros(3, dtype=torch.int64, device=DEVICE)),
     dict(backend="triton"), "float64 only with backend='torch'"),
])
def test_selected_bad_input(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        selected_logprobs(*args, **kwargs)


# ---------------------------------------------------------------- fused_linear_logprobs

def linear_problem(n, d, vocab, gen, bias=True, dtype=torch.float32):
    hidden = torch.randn(n, d, generator=gen).to(dtype)
    weight = (torch.randn(vocab, d, generator=gen) / d ** 0.5).to(dtype)
    b = (torch.randn(vocab, generator=gen) * 0.5).to(dtype) if bias else None
    return hidden, weight, b, random_targets(n, vocab, gen), torch.randn(n, generator=gen)


def run_fused(hidden, weight, bias, targets, weights, temperature, device=torch.device("cpu"), **kwargs):
    """fused_linear_logprobs forward + backward on `device`; the value and gradients back on the CPU."""
    leaves = [t.detach().to(device).requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logp = fused_linear_logprobs(leaves[0], leaves[1], targets.to(device), bias=leaves[2], temperature=temperature,
                                 **kwargs)
    (logp * weights.to(device)).sum().backward()
    return [logp.detach().cpu()] + [t.grad.cpu() if t is not None else None for t in leaves]


def reference_fused(hidden, weight, bias, targets, weights, temperature):
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logits = F.linear(leaves[0], leaves[1], leaves[2])
    logp = reference.selected_logprobs(logits, targets, temperature)
    (logp * weights.double()).sum().backward()
    return [logp.detach()] + [t.grad if t is not None else None for t in leaves]


def torch_own_fused(hidden, weight, bias, targets, weights, temperature):
    """Eager PyTorch in the inputs' precision: F.linear, then log_softmax of the float logits."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    logits = F.linear(leaves[0], leaves[1], leaves[2])
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    logp = logp.masked_fill(targets == -100, 0.0)
    (logp * weights).sum().backward()
    return [logp.detach()] + [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("vocab,bias,temperature,chunk_bytes,vocab_tile", [
    (41, True, 1.0, 4 * 41 * 5, 16),  # several vocabulary slices and row chunks
    (1000, False, 0.7, 4 * 1000 * 8, 32768),
    (1000, True, 1.3, 1 << 20, 256),
])
def test_fused_linear_fp32(backend, gen, monkeypatch, vocab, bias, temperature, chunk_bytes, vocab_tile):
    monkeypatch.setattr(fll, "VOCAB_TILE", vocab_tile)
    problem = linear_problem(37, 19, vocab, gen, bias=bias)
    got = run_fused(*problem, temperature, device=DEVICE, chunk_bytes=chunk_bytes, backend=backend)
    ref = reference_fused(*problem, temperature)
    for name, g, r in zip(("logprob", "hidden", "weight", "bias"), got, ref):
        if r is None:
            assert g is None
            continue
        inputs = dict(zip(("hidden", "weight", "bias"), problem))
        assert g.dtype == (torch.float32 if name == "logprob" else inputs[name].dtype)
        assert_fp32_close(g, r, name)


def test_fused_linear_minus_inf_slice(backend, gen, monkeypatch):
    """A vocabulary slice whose logits are all -inf in every row (bias -inf over it) and a lone -inf
    logit elsewhere: that tile's log-sum-exp is -inf, and the log-probs and gradients are float64's,
    by both routes (trainable and frozen head). The Triton tile pass once gave such a tile NaN."""
    monkeypatch.setattr(fll, "VOCAB_TILE", 16)
    hidden, weight, bias, targets, weights = linear_problem(37, 19, 41, gen)
    bias[16:32] = float("-inf")
    bias[3] = float("-inf")
    targets[((targets >= 16) & (targets < 32)) | (targets == 3)] = 0
    got = run_fused(hidden, weight, bias, targets, weights, 0.8, device=DEVICE, chunk_bytes=4 * 16 * 5,
                    backend=backend)
    ref = reference_fused(hidden, weight, bias, targets, weights, 0.8)
    for name, g, r in zip(("logprob", "hidden", "weight", "bias"), got, ref):
        assert_fp32_close(g, r, name)
    frozen = frozen_head_grads(hidden, weight, bias, targets, weights, 0.8, device=DEVICE, chunk_bytes=4 * 16 * 5,
                               backend=backend)
    assert_fp32_close(frozen[0], ref[0], "logprob, frozen head")
    assert_fp32_close(frozen[1], ref[1], "hidden, frozen head")


def test_fused_linear_real_vocab(gen):
    problem = linear_problem(3, 16, 126464, gen)
    got = run_fused(*problem, 1.0)
    ref = reference_fused(*problem, 1.0)
    for name, g, r in zip(("logprob", "hidden", "weight", "bias"), got, ref):
        assert_fp32_close(g, r, name)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_linear_low_precision(backend, gen, monkeypatch, dtype, bias):
    monkeypatch.setattr(fll, "VOCAB_TILE", 128)
    problem = linear_problem(29, 24, 500, gen, bias=bias, dtype=dtype)
    got = run_fused(*problem, 0.9, device=DEVICE, chunk_bytes=4 * 128 * 8, backend=backend)
    ref = reference_fused(*problem, 0.9)
    own = torch_own_fused(*problem, 0.9)
    for name, g, r, o in zip(("logprob", "hidden", "weight", "bias"), got, ref, own):
        if r is None:
            continue
        assert g.dtype == (torch.float32 if name == "logprob" else dtype), name
        assert rel_err(g, r) <= rel_err(o, r) + 1e-4, name


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("bias", [True, False])
def test_logits_tile_is_a_16_bit_gemm_rounded_once(gen, dtype, bias):
    """A logits tile of 16-bit inputs (float32 GEMM on CPU): the exact product, rounded once."""
    hidden, weight, b, _, _ = linear_problem(33, 200, 77, gen, bias=bias, dtype=dtype)
    tile = fll._logits_tile(hidden.to(DEVICE), weight.to(DEVICE), None if b is None else b.to(DEVICE))
    exact = F.linear(hidden.double(), weight.double(), None if b is None else b.double())
    assert tile.dtype == dtype
    assert_rounded_once(tile.cpu(), exact, "logits tile")


def test_fused_linear_mixed_dtypes(gen):
    """bf16 hidden with an fp32 LM head (autocast training): matmuls in bf16, grads in each input's dtype."""
    hidden, weight, bias, targets, weights = linear_problem(11, 16, 300, gen)
    got = run_fused(hidden.bfloat16(), weight, bias, targets, weights, 1.0)
    ref = reference_fused(hidden.bfloat16(), weight.bfloat16(), bias.bfloat16(), targets, weights, 1.0)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32 and got[3].dtype == torch.float32
    for g, r in zip(got, ref):
        assert rel_err(g, r) < 2e-2


def test_fused_linear_gradcheck_double(gen, monkeypatch):
    monkeypatch.setattr(fll, "VOCAB_TILE", 4)
    hidden, weight, bias, targets, _ = linear_problem(5, 3, 9, gen)
    inputs = tuple(t.double().requires_grad_() for t in (hidden, weight, bias))
    assert torch.autograd.gradcheck(
        lambda h, w, b: fused_linear_logprobs(h, w, targets, bias=b, temperature=0.8, chunk_bytes=8 * 4 * 2),
        inputs, eps=1e-6, atol=1e-7)


def test_fused_linear_frozen_head(gen):
    """Only hidden needs a gradient (frozen LM head): the weight gets none."""
    hidden, weight, _, targets, weights = linear_problem(7, 8, 50, gen, bias=False)
    h = hidden.clone().requires_grad_()
    (fused_linear_logprobs(h, weight, targets) * weights).sum().backward()
    ref = reference_fused(hidden, weight, None, targets, weights, 1.0)
    assert weight.grad is None
    assert_fp32_close(h.grad, ref[1])


def frozen_head_grads(hidden, weight, bias, targets, weights, temperature, device=torch.device("cpu"), **kwargs):
    """fused_linear_logprobs with only hidden trainable: (logp, hidden's gradient) back on the CPU."""
    h = hidden.detach().to(device).requires_grad_()
    logp = fused_linear_logprobs(h, weight.to(device), targets.to(device),
                                 bias=None if bias is None else bias.to(device), temperature=temperature, **kwargs)
    (logp * weights.to(device)).sum().backward()
    return logp.detach().cpu(), h.grad.cpu()


@pytest.mark.parametrize("vocab,bias,temperature,chunk_bytes,vocab_tile,peaked", [
    (41, True, 1.0, 4 * 41 * 5, 16, False),  # several vocabulary slices and row chunks
    (1000, False, 0.7, 4 * 1000 * 8, 32768, True),  # rows whose max grows slice after slice
    (1000, True, 1.3, 1 << 20, 256, True),
    (126464, False, 1.0, None, 8192, False),
])
def test_fused_linear_frozen_head_route(backend, gen, monkeypatch, vocab, bias, temperature, chunk_bytes, vocab_tile,
                                       peaked):
    """A frozen head's route (hidden's gradient from the forward's walk) against float64, with a -inf
    logit (the [MASK] bias), ignored targets and, where peaked, logits whose row max keeps growing
    across the vocabulary slices (every rescaling of the running sums is exercised)."""
    monkeypatch.setattr(fll, "VOCAB_TILE", vocab_tile)
    monkeypatch.setattr(fll, "GATHER_ROWS", 16)  # the target rows in several gathers
    hidden, weight, b, targets, weights = linear_problem(37, 19, vocab, gen, bias=bias)
    if peaked:
        weight = weight * torch.linspace(0.5, 8.0, vocab)[:, None]
    if b is not None:
        b[vocab // 3] = float("-inf")
    targets[targets == vocab // 3] = 0
    got = frozen_head_grads(hidden, weight, b, targets, weights, temperature, device=DEVICE, chunk_bytes=chunk_bytes,
                            backend=backend)
    ref = reference_fused(hidden, weight, None if b is None else b.detach(), targets, weights, temperature)
    assert_fp32_close(got[0], ref[0], "logprob")
    assert_fp32_close(got[1], ref[1], "hidden")


@pytest.mark.parametrize("dtype", LOW)
def test_fused_linear_frozen_head_low_precision(backend, gen, monkeypatch, dtype):
    monkeypatch.setattr(fll, "VOCAB_TILE", 128)
    hidden, weight, bias, targets, weights = linear_problem(29, 24, 500, gen, dtype=dtype)
    got = frozen_head_grads(hidden, weight, bias, targets, weights, 0.9, device=DEVICE, chunk_bytes=4 * 128 * 8,
                            backend=backend)
    ref = reference_fused(hidden, weight, bias, targets, weights, 0.9)
    own = torch_own_fused(hidden, weight, bias, targets, weights, 0.9)
    assert got[1].dtype == dtype
    assert rel_err(got[0], ref[0]) <= rel_err(own[0], ref[0]) + 1e-4
    assert rel_err(got[1], ref[1]) <= rel_err(own[1], ref[1]) + 1e-4


def test_fused_linear_frozen_head_recomputes_nothing(backend, gen, monkeypatch):
    """Only hidden trainable: the backward is a scaling of the forward's gradient (no tile GEMM runs);
    a trainable head still takes the recomputing backward; both give the same log-probs."""
    hidden, weight, bias, targets, weights = linear_problem(9, 8, 70, gen)
    calls = []
    real_backward = fll._backward
    monkeypatch.setattr(fll, "_backward", lambda *args: calls.append(1) or real_backward(*args))
    frozen = frozen_head_grads(hidden, weight, bias, targets, weights, 0.7, device=DEVICE, backend=backend)
    assert not calls
    trainable = run_fused(hidden, weight, bias, targets, weights, 0.7, device=DEVICE, backend=backend)
    assert calls
    assert torch.equal(frozen[0], trainable[0])  # the same log-probs, bit for bit (single-pass updates rely on it)
    assert_fp32_close(frozen[1], trainable[1].double())


def test_fused_linear_frozen_head_gradcheck_double(gen, monkeypatch):
    monkeypatch.setattr(fll, "VOCAB_TILE", 4)
    hidden, weight, bias, targets, _ = linear_problem(5, 3, 9, gen)
    h = hidden.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h: fused_linear_logprobs(h, weight.double(), targets, bias=bias.double(), temperature=0.8,
                                        chunk_bytes=8 * 4 * 2), (h,), eps=1e-6, atol=1e-7)


def test_fused_linear_never_holds_full_logits(gen):
    """No single allocation comes near the [N, V] logits (the profiler records every op's allocations)."""
    n, d, vocab = 256, 16, 8192
    hidden, weight, bias, targets, weights = linear_problem(n, d, vocab, gen)
    chunk_bytes = 64 * 1024
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with torch.profiler.profile(profile_memory=True) as prof:
        (fused_linear_logprobs(h, w, targets, bias=bias, chunk_bytes=chunk_bytes) * weights).sum().backward()
    largest = max(e.cpu_memory_usage for e in prof.events())
    logits_bytes = n * vocab * 4  # 8 MiB
    weight_bytes = vocab * d * 4  # the weight gradient itself: 512 KiB
    assert largest <= weight_bytes + 64 * 1024, f"{largest} bytes in one op; full logits take {logits_bytes}"


@pytest.mark.parametrize("kwargs,match", [
    (dict(hidden=torch.zeros(2, 3, 4)), r"hidden must have shape \[N, D\]"),
    (dict(weight=torch.zeros(10, 5)), r"weight must have shape \[V, D=4\]"),
    (dict(weight=torch.zeros(1, 4)), "V >= 2"),
    (dict(hidden=torch.zeros(3, 4, dtype=torch.int64)), "hidden must be float32"),
    (dict(bias=torch.zeros(9)), r"bias must have shape \[V=10\]"),
    (dict(targets=torch.tensor([0, 10, 1])), r"targets must lie in \[0, 10\) or -100"),
    (dict(targets=torch.zeros(2, dtype=torch.int64)), "targets must have shape"),
    (dict(chunk_bytes=0), "chunk_bytes must be a positive int"),
    (dict(temperature=-1.0), "temperature"),
])
def test_fused_linear_bad_input(kwargs, match):
    args = dict(hidden=torch.zeros(3, 4), weight=torch.zeros(10, 4), targets=torch.zeros(3, dtype=torch.int64))
    args.update(kwargs)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(hidden, weight, targets, **args)
