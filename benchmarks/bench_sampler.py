"""The sampler's per-step post-processing against LLaDA's reference, and the cost of recording the trace.

Post-processing is everything after the transformer body at one step: B = 8, prompt 128, gen 256,
block 32 (32 candidates per sequence), V = 126464, temperature 1 (Gumbel sampling). A stub model
returns fixed hidden states, so only post-processing is timed. atpo_fast applies the LM head to the
256 candidate rows and runs one token_stats pass; LLaDA's reference applies it to all 3072
positions, then float64 Gumbel noise and a float64 softmax over [B, L, V] and a top-k per row.
Recording overhead: whole rollouts of the tiny model, generate(record=True) against record=False.

    python -m benchmarks.bench_sampler [--quick]
"""

from __future__ import annotations

import time

import torch
from torch import nn

from atpo_fast import generate, sampler
from atpo_fast.models import TinyDiffusionLM
from atpo_fast.models.base import DiffusionLM
from atpo_fast.reference import llada_step
from atpo_fast.sampler import denoise_step
from benchmarks.common import (CPU_COLUMNS, cuda_peak_extra_bytes, machine_info, parse_args, print_table,
                               run_cpu_suite, time_interleaved, write_results)

LLADA_VOCAB, LLADA_MASK = 126464, 126336


class FixedHiddenLM(DiffusionLM):
    """A stand-in whose 'forward' returns fixed hidden states: post-processing is all that costs."""

    def __init__(self, batch: int, length: int, dim: int, vocab: int, mask_id: int, dtype, device):
        super().__init__()
        self.mask_id, self.vocab_size, self.max_length = mask_id, vocab, length
        gen = torch.Generator(device=device).manual_seed(0)
        self.hidden = torch.randn(batch, length, dim, generator=gen, device=device).to(dtype)
        self.head = nn.Linear(dim, vocab, bias=False, device=device, dtype=dtype)

    @property
    def lm_head(self):
        return self.head

    def _hidden_states(self, input_ids, attention_mask):
        return self.hidden


def postprocess_case(device: str, dim: int, dtype, batch=8, prompt=128, gen_length=256, block=32):
    model = FixedHiddenLM(batch, prompt + gen_length, dim, LLADA_VOCAB, LLADA_MASK, dtype, device)
    tokens = torch.randint(0, LLADA_MASK, (batch, prompt + gen_length), device=device)
    tokens[:, prompt:] = LLADA_MASK
    window = slice(prompt, prompt + block)
    one_each = torch.ones(batch, dtype=torch.int64, device=device)

    @torch.no_grad()
    def ours():
        denoise_step(model, tokens, None, window, one_each, threshold=None, temperature=1.0,
                     remasking="low_confidence", seed=0, generator=None, backend="auto")

    @torch.no_grad()
    def reference():
        llada_step(model.logits(tokens), tokens, LLADA_MASK, window.stop, one_each, temperature=1.0)

    return {"atpo_fast": ours, "LLaDA reference": reference}


def trace_overhead(device: str, batch: int, gen_length: int) -> dict:
    """Rollout time with the trace against without it, and the time spent inside the recorder itself."""
    torch.manual_seed(0)
    model = TinyDiffusionLM().to(device).eval()
    prompt = torch.randint(4, model.vocab_size, (batch, 32), device=device)
    kwargs = dict(gen_length=gen_length, block_length=16, steps=gen_length, temperature=1.0, seed=0)
    if device == "cuda":
        kwargs["backend"] = "triton"
    times = time_interleaved({record: (lambda record=record: _rollout(model, prompt, record, kwargs))
                              for record in (True, False)})
    on, off = times[True], times[False]
    inside = [0.0]
    add = sampler._TraceRecorder.add

    def timed_add(self, *args, **kw):
        start = time.perf_counter()
        add(self, *args, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        inside[0] += time.perf_counter() - start

    sampler._TraceRecorder.add = timed_add
    try:
        start = time.perf_counter()
        _rollout(model, prompt, True, kwargs)
        total = time.perf_counter() - start
    finally:
        sampler._TraceRecorder.add = add
    return {"rollout_ms_record_on": on * 1e3, "rollout_ms_record_off": off * 1e3,
            "trace_overhead_pct": 100 * (on / off - 1),
            "recorder_ms": inside[0] * 1e3, "recorder_pct": 100 * inside[0] / total}


def _rollout(model, prompt, record: bool, kwargs):
    generate(model, prompt, record=record, **kwargs)
    if prompt.is_cuda:
        torch.cuda.synchronize()


FULL = dict(batch=8, prompt=128, gen_length=256, block=32)
QUICK = dict(batch=2, prompt=16, gen_length=32, block=16)


def cpu_cases(quick: bool) -> dict:
    """One step's post-processing: LLaDA's reference (the baseline) against atpo_fast (see run_cpu_suite)."""
    shape, dim = (QUICK, 64) if quick else (FULL, 256)
    name = (f"sampler step B={shape['batch']} L={shape['prompt'] + shape['gen_length']} V={LLADA_VOCAB} D={dim} "
            "float32")
    return {name: (("LLaDA reference", "atpo_fast"), lambda: postprocess_case("cpu", dim, torch.float32, **shape))}


def main() -> None:
    args = parse_args(__doc__)
    table = run_cpu_suite(["bench_sampler"], args.quick)
    if torch.cuda.is_available() and not args.quick:
        from triton.testing import do_bench

        times, peaks = {}, {}
        for name, fn in postprocess_case("cuda", 4096, torch.bfloat16, **FULL).items():
            peaks[name] = cuda_peak_extra_bytes(fn)
            times[name] = do_bench(fn, return_mode="median")
        for name in times:
            table.append({"case": "sampler step B=8 L=384 V=126464 D=4096 bfloat16 (cuda)", "variant": name,
                          "time_ms": times[name], "peak_extra_MiB": peaks[name] / 2**20, "baseline": "LLaDA reference",
                          "speedup": times["LLaDA reference"] / times[name],
                          "memory_vs_baseline": peaks[name] / peaks["LLaDA reference"]})
    overhead = [dict(device="cpu", **trace_overhead("cpu", 4 if args.quick else 8, 32 if args.quick else 64))]
    if torch.cuda.is_available():
        overhead.append(dict(device="cuda", **trace_overhead("cuda", 8, 64)))
    print_table(CPU_COLUMNS, table)
    print_table(OVERHEAD_COLUMNS, overhead)
    if not args.quick:
        write_results("sampler", "Sampler post-processing per step: atpo_fast against LLaDA's reference",
                      CPU_COLUMNS, table, machine_info(), overhead_note(overhead))


OVERHEAD_COLUMNS = ["device", "rollout_ms_record_on", "rollout_ms_record_off", "trace_overhead_pct", "recorder_ms",
                    "recorder_pct"]


def overhead_note(overhead: list[dict]) -> str:
    return ("Trace overhead (tiny model, B=8, prompt 32, gen 64, block 16, 64 steps): " + "; ".join(
        f"{o['device']}: the recorder itself takes {o['recorder_ms']:.1f} ms = {o['recorder_pct']:.2f}% of a "
        f"rollout; wall clock with the trace against without (interleaved medians) {o['rollout_ms_record_on']:.1f} "
        f"ms against {o['rollout_ms_record_off']:.1f} ms ({o['trace_overhead_pct']:+.2f}%)" for o in overhead))


if __name__ == "__main__":
    main()
