"""Rollout wall time with the block KV caches: generate(cache="none" | "prefix" | "dual") in one run.

A bidirectional model with LLaDA's vocabulary and random weights (no download): on CPU 8 layers of
width 1024, B = 4, prompt 128, gen 256, block 32, 256 steps; on CUDA LLaDA-8B's exact shape in
bf16, batch 64. Reported per mode: wall time, speed-up over "none", response tokens per second,
and the share of response tokens equal to the exact ("none") rollout's (greedy, the same prompts).

    python -m benchmarks rollout [--quick]
"""

from __future__ import annotations

import time

import torch

from atpo_fast import generate
from atpo_fast.config import TinyConfig
from atpo_fast.models import TinyDiffusionLM
from benchmarks.common import machine_info, parse_args, print_table, write_results

LLADA_VOCAB = 126464
MODES = ("none", "prefix", "dual")
CPU = dict(width=1024, layers=8, heads=16, mlp=2816, batch=4, prompt=128, gen=256, block=32, steps=256)
CUDA = dict(width=4096, layers=32, heads=32, mlp=12288, batch=64, prompt=128, gen=256, block=32, steps=256)
QUICK = dict(width=128, layers=2, heads=4, mlp=256, batch=2, prompt=16, gen=64, block=16, steps=64)
COLUMNS = ["mode", "wall_s", "speedup", "tokens_per_s", "agreement", "shape"]


def rollout_times(shape: dict, device: str) -> list[dict]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = TinyConfig(hidden_size=shape["width"], num_layers=shape["layers"], num_heads=shape["heads"],
                        intermediate_size=shape["mlp"], max_length=shape["prompt"] + shape["gen"],
                        vocab_size=LLADA_VOCAB)
    model = TinyDiffusionLM(config).to(device, dtype).eval()
    prompt = torch.randint(4, 4 + len(config.chars), (shape["batch"], shape["prompt"]), device=device)
    kwargs = dict(gen_length=shape["gen"], block_length=shape["block"], steps=shape["steps"], temperature=0.0)
    generate(model, prompt[:, :8], **{**kwargs, "gen_length": shape["block"], "steps": 2})  # warm-up
    results, exact = [], None
    for mode in MODES:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        rollout = generate(model, prompt, cache=mode, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        exact = rollout.response if exact is None else exact
        results.append({"mode": mode, "wall_s": wall, "tokens_per_s": rollout.response.numel() / wall,
                        "agreement": (rollout.response == exact).float().mean().item()})
        print(f"{mode}: {wall:.2f} s", flush=True)
    for row in results:
        row["speedup"] = results[0]["wall_s"] / row["wall_s"]
        row["shape"] = (f"L={shape['layers']} d={shape['width']} V={LLADA_VOCAB} B={shape['batch']} "
                        f"prompt={shape['prompt']} gen={shape['gen']} block={shape['block']} steps={shape['steps']}")
    return results


def main(quick: bool) -> None:
    device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    shape = QUICK if quick else (CUDA if device == "cuda" else CPU)
    table = rollout_times(shape, device)
    print_table(COLUMNS, table)
    if quick:
        return
    notes = ("Greedy rollouts of one random-weight bidirectional model with LLaDA's vocabulary, the three cache "
             "modes one after the other in one process; agreement: share of response tokens equal to the "
             "cache='none' rollout's.")
    path = write_results("rollout", "Rollouts with block KV caches", COLUMNS, table, machine_info(), notes)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
