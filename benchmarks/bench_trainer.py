"""One ATPO iteration (rollout + update) with atpo_fast, against the same iteration on the plain PyTorch path.

Model: a randomly initialised bidirectional Llama at LLaDA-8B's shape (hidden 4096, 32 heads, MLP
12288, vocabulary 126464, 32 layers; --layers shortens it to fit a short GPU run), bf16 on CUDA.
Batch: 2 prompts x 4 responses of 256 tokens after a 128-token prompt, 64 steps in blocks of 32,
8 rows per response, micro-batches of 4 rows.
  atpo_fast: the sampler with fused token_stats (recording the trace), the hybrid rule, the C++/CUDA
             step rows, and fused_linear_logprobs at the target positions only.
  plain:     each sampling step as LLaDA's reference does it (LM head on every position, float64
             softmax and Gumbel noise), the uniform TraceRL rule (no signals computed), torch step
             rows, and eager log_softmax over the full [rows, L, V] logits.
Both run Trainer.train_iteration; reported: iteration, rollout and update time, peak memory.

    python -m benchmarks.bench_trainer [--layers 4]     # CUDA (on CPU: the --quick shapes)
    python -m benchmarks.bench_trainer --quick          # small CPU shapes (CI smoke)
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import torch

from atpo_fast.cli import positive_int
from atpo_fast.config import load_config
from atpo_fast.models import TinyConfig, TinyDiffusionLM
from atpo_fast.reference import llada_step
from atpo_fast.sampler import transfer_schedule
from atpo_fast.trace import Rollout, Trace
from atpo_fast.tasks import Example, Task
from atpo_fast.trainer import Trainer, peak_memory_mb
from benchmarks.common import machine_info, print_table, write_results

LLADA_SHAPE = dict(hidden_size=4096, num_heads=32, intermediate_size=12288, vocab_size=126464, num_layers=32)
QUICK_SHAPE = dict(hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=2048, num_layers=2)
CUDA_RUN = dict(prompt=128, gen_length=256, block_length=32, steps=64, prompts=2, group=4, budget=8, micro=4)
QUICK_RUN = dict(prompt=16, gen_length=32, block_length=16, steps=16, prompts=2, group=4, budget=4, micro=4)


class RandomTextTask(Task):
    """Random prompts and a reward that is a fixed pseudo-random function of the response text."""

    def __init__(self, prompt_chars: int, count: int = 64):
        gen = torch.Generator().manual_seed(0)
        letters = "abcdefghijklmnopqrstuvwxyz0123456789 "
        self.train = self.test = [
            Example(prompt="".join(letters[i] for i in torch.randint(0, len(letters), (prompt_chars,), generator=gen)),
                    target="") for _ in range(count)]

    def reward(self, example, response):
        return (zlib.crc32(response.encode()) % 1000) / 1000


class PlainTrainer(Trainer):
    """The same iteration without atpo_fast: LLaDA-reference sampling, torch step rows, eager log-probs."""

    step_rows_backend = "torch"

    @torch.no_grad()
    def rollout(self, examples, repeats, temperature, seed, first_prompt=0):
        s, model = self.config.sampler, self.model
        ids, mask = model.encode_prompts([ex.prompt for ex in examples for _ in range(repeats)], self.device)
        batch, prompt_len = ids.shape
        tokens = torch.full((batch, prompt_len + s.gen_length), model.mask_id, dtype=torch.int64, device=self.device)
        tokens[:, :prompt_len] = ids
        full_mask = torch.cat([mask, torch.ones(batch, s.gen_length, dtype=torch.int64, device=self.device)], 1)
        step_map = torch.full(tokens.shape, -1, dtype=torch.int64, device=self.device)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        per_block, step = s.steps // (s.gen_length // s.block_length), 0
        for end in range(prompt_len + s.block_length, tokens.shape[1] + 1, s.block_length):
            schedule = transfer_schedule((tokens[:, end - s.block_length:end] == model.mask_id).sum(1), per_block)
            for i in range(per_block):
                if not bool((schedule[:, i] > 0).any()):
                    continue
                with self.autocast:
                    logits = model.logits(tokens, full_mask)
                new = llada_step(logits, tokens, model.mask_id, end, schedule[:, i], temperature, generator)
                step_map[new != tokens] = step
                tokens, step = new, step + 1
        counts = torch.stack([(step_map == t).sum(1) for t in range(step)], 1)
        nan = torch.full(counts.shape, float("nan"), device=self.device)
        trace = Trace(nan, nan, nan, nan, nan, nan, counts, torch.zeros_like(counts),
                      torch.zeros(step, dtype=torch.int64))
        return Rollout(tokens, step_map, trace, prompt_len, full_mask)

    def row_logprobs(self, selected, batch):
        if batch is None:
            return super().row_logprobs(selected, batch)
        rows, (r0, r1, t0, t1) = selected.rows, batch
        with self.autocast:
            logits = self.model.logits(rows.input_ids[r0:r1], selected.attention[r0:r1])
        logprobs = torch.log_softmax(logits.float(), dim=-1)[rows.target_row[t0:t1] - r0, rows.target_pos[t0:t1]]
        return logprobs.gather(1, rows.target_token[t0:t1, None]).squeeze(1)


def run(variant: str, shape: dict, plan: dict, device: str, iterations: int = 2) -> dict:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = TinyDiffusionLM(TinyConfig(**shape, max_length=plan["prompt"] + plan["gen_length"])).to(device, dtype)
    config = load_config(None, [
        f"device={device}", f"sampler.gen_length={plan['gen_length']}", f"sampler.block_length={plan['block_length']}",
        f"sampler.steps={plan['steps']}", f"optim.prompts_per_iter={plan['prompts']}",
        f"optim.group_size={plan['group']}",
        f"selection.budget={plan['budget']}", f"optim.micro_batch_rows={plan['micro']}", "optim.lr=1e-6",
        f"selection.rule={'hybrid' if variant == 'atpo_fast' else 'uniform'}"])
    cls = Trainer if variant == "atpo_fast" else PlainTrainer
    trainer = cls(config, model=model, task=RandomTextTask(plan["prompt"]))
    trainer.train_iteration()  # warm-up: kernel compilation and first allocations stay out of the figures
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, rollout, update = [], [], []
    for i in range(iterations):
        trainer.iteration = i + 1
        start = time.perf_counter()
        metrics = trainer.train_iteration()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        rollout.append(metrics["rollout_time"])
        update.append(metrics["update_time"])
    return {"variant": variant, "layers": shape["num_layers"], "iteration_s": statistics.median(times),
            "rollout_s": statistics.median(rollout), "update_s": statistics.median(update),
            "peak_memory_MiB": peak_memory_mb(torch.device(device)), "rows": metrics["rows"],
            "targets": metrics["targets"]}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small CPU shapes, no result files")
    parser.add_argument("--layers", type=positive_int, default=4, help="transformer layers of the LLaDA-shaped model")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    shape = dict(LLADA_SHAPE, num_layers=args.layers) if cuda else QUICK_SHAPE
    plan, device = (CUDA_RUN, "cuda") if cuda else (QUICK_RUN, "cpu")
    table = []
    for variant in ("atpo_fast", "plain"):
        table.append(run(variant, shape, plan, device))
        if cuda:
            torch.cuda.empty_cache()
    for row in table:
        row["speedup"] = table[1]["iteration_s"] / row["iteration_s"]
        row["memory_vs_plain"] = row["peak_memory_MiB"] / table[1]["peak_memory_MiB"]
    columns = ["variant", "layers", "iteration_s", "rollout_s", "update_s", "peak_memory_MiB", "rows", "targets",
               "speedup", "memory_vs_plain"]
    print_table(columns, table)
    if not args.quick:
        notes = (f"Model {shape}, run {plan}. CPU peak memory is the process's peak resident size (ru_maxrss); "
                 "CUDA peak memory is torch.cuda.max_memory_allocated.")
        write_results("trainer", "One ATPO iteration: atpo_fast against the plain PyTorch path", columns, table,
                      machine_info(), notes)
    return table


if __name__ == "__main__":
    main()
