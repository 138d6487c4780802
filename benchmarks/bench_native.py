"""atpo-train on a LLaDA checkpoint folder loaded natively, at LLaDA-8B's exact shape (random weights, no download).

What a user with a real checkpoint runs, end to end: a folder in LLaDA's own layout (config.json, safetensors
shards under LLaDA's tensor names with their index, a tokenizer; atpo_fast.models.synthetic) is loaded by the
native loader, and `atpo-train --config configs/llada_lora.yaml` (LoRA, activation checkpointing, the config's KV
cache) runs an iteration of ATPO on it. The weights are random, so the task is one a random model can score on:
`parity`, registered here (reward 1 when the response's last number is even; the tokenizer's words are the ids
as numbers). Reported: the folder's write time and size, the run's wall time, and per iteration the rollout
time, tokens/s, update time, peak memory and whether the update ran.

    python -m benchmarks.bench_native           # CUDA: LLaDA-8B's shape, bf16 (16 GB on disk under $ATPO_NATIVE_DIR
                                                # or the temporary folder); writes benchmarks/results/native_llada_cuda_<date>.*
    python -m benchmarks.bench_native --quick   # CPU: the tiny shape, float32, no result files (the test)
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from atpo_fast.config import CONFIG, read_yaml
from atpo_fast.models.synthetic import LLADA_8B, TINY, write_checkpoint
from atpo_fast.tasks import Example, Task, register_task
from atpo_fast.tasks.jsonl import extract_number
from benchmarks.common import REPO, machine_info, print_table, write_results

COLUMNS = ["iteration", "rollout_time", "tokens_per_second", "update_time", "peak_memory_mb", "updated", "reward",
           "rollout_logprob_gap"]
CUDA_RUN = ["device=cuda", "model.dtype=bfloat16", "optim.iterations=1", "optim.prompts_per_iter=8",
            "optim.group_size=8", "eval.size=8", "eval.pass_k=0"]
QUICK_RUN = ["device=cpu", "model.dtype=float32", "optim.iterations=1", "optim.prompts_per_iter=2",
             "optim.group_size=4", "optim.micro_batch_rows=8", "sampler.gen_length=8", "sampler.block_length=4",
             "sampler.steps=4", "selection.budget=2", "eval.size=2", "eval.pass_k=0",
             "model.activation_checkpointing=false"]


@register_task("parity")
class Parity(Task):
    """Prompts of three numbers; a response earns 1 when its last number is even (a random model: about half)."""

    def __init__(self, train_size: int = 64, test_size: int = 8, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        numbers = torch.randint(3, 1000, (train_size + test_size, 3), generator=gen).tolist()
        examples = [Example(prompt=" ".join(map(str, row)), target="4") for row in numbers]
        self.train, self.test = examples[:train_size], examples[train_size:]

    def reward(self, example: Example, response: str) -> float:
        number = extract_number(response)
        return float(number is not None and number.denominator == 1 and number.numerator % 2 == 0)


def main(quick: bool) -> list[dict]:
    from atpo_fast.cli import train_main
    from atpo_fast.run import METRICS, read_metrics

    cuda = torch.cuda.is_available() and not quick
    work = Path(os.environ.get("ATPO_NATIVE_DIR") or tempfile.mkdtemp(prefix="atpo_native_"))
    folder = work / "llada"
    start = time.perf_counter()
    generator = torch.Generator(device="cuda" if cuda else "cpu").manual_seed(0)
    write_checkpoint(folder, "llada", generator, dtype=torch.bfloat16 if cuda else torch.float32,
                     shape=LLADA_8B if cuda else TINY, shards=6 if cuda else 2, std=0.02, numbers=True)
    write_s = time.perf_counter() - start
    size_gb = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
    print(f"wrote {folder} ({size_gb:.1f} GB) in {write_s:.0f} s", flush=True)

    argv = ["--config", str(REPO / "configs" / "llada_lora.yaml"), "--model", str(folder), "--task", "parity",
            "--quiet", "--name", "native", f"logging.run_dir={work}"] + (CUDA_RUN if cuda else QUICK_RUN)
    start = time.perf_counter()
    if train_main(argv) != 0:
        raise RuntimeError("atpo-train failed (its error is above)")
    run_s = time.perf_counter() - start
    history = read_metrics(work / "native" / METRICS)
    table = [{**{k: row.get(k) for k in COLUMNS}, "updated": "skipped" not in row}
             for row in history if "rollout_time" in row]
    print_table(COLUMNS, table)
    print(f"atpo-train: {run_s:.0f} s in all (loading, held-out evaluation before and after, iterations)")
    if cuda:
        config = json.loads((folder / "config.json").read_text())
        sampler = read_yaml(work / "native" / CONFIG)["sampler"]
        notes = (f"configs/llada_lora.yaml with {' '.join(CUDA_RUN)}, --task parity, on a folder in LLaDA's layout "
                 f"(d_model {config['d_model']}, {config['n_layers']} blocks, vocabulary {config['vocab_size']}, "
                 f"6 shards, bf16, random weights N(0, 0.02^2)): {size_gb:.1f} GB written in {write_s:.0f} s; the "
                 f"run took {run_s:.0f} s in all. Sampler: cache {sampler['cache']}, gen {sampler['gen_length']}, "
                 f"block {sampler['block_length']}, {sampler['steps']} steps.")
        write_results("native_llada", "atpo-train on a LLaDA-layout folder at LLaDA-8B's shape, loaded "
                      "natively", COLUMNS, table, machine_info(), notes)
    return table


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    main(parser.parse_args().quick)
