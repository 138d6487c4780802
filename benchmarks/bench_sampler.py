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

import json

import torch
from torch import nn

from atpo_fast import generate
from atpo_fast.models import TinyDiffusionLM
from atpo_fast.models.base import DiffusionLM
from atpo_fast.reference import llada_step
from atpo_fast.sampler import denoise_step
from benchmarks.common import (machine_info, measure_cpu, measure_in_workers, parse_args, print_table,
                               time_interleaved, write_results)

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
    torch.manual_seed(0)
    model = TinyDiffusionLM().to(device).eval()
    prompt = torch.randint(4, model.vocab_size, (batch, 32), device=device)
    kwargs = dict(gen_length=gen_length, block_length=16, steps=gen_length, temperature=1.0, seed=0)
    if device == "cuda":
        kwargs["backend"] = "triton"
    times = time_interleaved({record: (lambda record=record: _rollout(model, prompt, record, kwargs))
                              for record in (True, False)})
    on, off = times[True], times[False]
    return {"rollout_ms_record_on": on * 1e3, "rollout_ms_record_off": off * 1e3, "trace_overhead_pct": 100 * (on / off - 1)}


def _rollout(model, prompt, record: bool, kwargs):
    generate(model, prompt, record=record, **kwargs)
    if prompt.is_cuda:
        torch.cuda.synchronize()


def _worker(variant: str, dim: int) -> dict:
    return measure_cpu(postprocess_case("cpu", dim, torch.float32)[variant], repeats=3)


def main() -> None:
    args = parse_args(__doc__, ("VARIANT", "DIM"))
    if args.worker:
        print(json.dumps(_worker(args.worker[0], int(args.worker[1]))))
        return
    rows = []
    dim = 64 if args.quick else 256
    if not args.quick:
        results = {v: measure_in_workers("benchmarks.bench_sampler", [v, str(dim)])
                   for v in ("atpo_fast", "LLaDA reference")}
        base = results["LLaDA reference"]
        for name, r in results.items():
            rows.append({"device": "cpu", "variant": name, "D": dim, "dtype": "float32", "step_ms": r["seconds"] * 1e3,
                         "peak_extra_MiB": r["peak_extra_bytes"] / 2**20, "speedup": base["seconds"] / r["seconds"],
                         "memory_vs_reference": r["peak_extra_bytes"] / base["peak_extra_bytes"]})
    if torch.cuda.is_available():
        from triton.testing import do_bench

        times, peaks = {}, {}
        for name, fn in postprocess_case("cuda", 4096, torch.bfloat16).items():
            fn()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            times[name] = do_bench(fn, return_mode="median")
            peaks[name] = torch.cuda.max_memory_allocated() - start
        for name in times:
            rows.append({"device": "cuda", "variant": name, "D": 4096, "dtype": "bfloat16", "step_ms": times[name],
                         "peak_extra_MiB": peaks[name] / 2**20, "speedup": times["LLaDA reference"] / times[name],
                         "memory_vs_reference": peaks[name] / peaks["LLaDA reference"]})
    overhead = [dict(device="cpu", **trace_overhead("cpu", 4 if args.quick else 8, 32 if args.quick else 64))]
    if torch.cuda.is_available():
        overhead.append(dict(device="cuda", **trace_overhead("cuda", 8, 64)))
    columns = ["device", "variant", "D", "dtype", "step_ms", "peak_extra_MiB", "speedup", "memory_vs_reference"]
    if rows:
        print_table(columns, rows)
    overhead_columns = ["device", "rollout_ms_record_on", "rollout_ms_record_off", "trace_overhead_pct"]
    print_table(overhead_columns, overhead)
    if not args.quick:
        meta = machine_info()
        notes = ("Trace overhead (tiny model, B=8, prompt 32, gen 64, block 16, 64 steps): " + "; ".join(
            f"{o['device']}: {o['trace_overhead_pct']:.2f}% ({o['rollout_ms_record_on']:.1f} ms with the trace, "
            f"{o['rollout_ms_record_off']:.1f} ms without)" for o in overhead))
        path = write_results("sampler", "Sampler post-processing per step: atpo_fast against LLaDA's reference",
                             columns, rows, meta, notes)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
