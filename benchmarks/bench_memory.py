"""Memory of one training iteration, measured by phase and predicted by a memory model.

Measured (CPU): a bidirectional Llama with LLaDA's vocabulary at a CPU-sized width, one ATPO
iteration after a warm-up one, peak resident memory above the process's state before the model
existed, per phase: rollout (collect), old log-probs (the no-grad pass a multi-epoch update needs),
update (forward, backward and AdamW step of one micro-batch). Four settings: full fine-tuning or
LoRA, each with and without activation checkpointing. Each setting runs in a fresh process started
with MALLOC_MMAP_THRESHOLD_ set, so that freed tensors leave the process and resident size follows
live memory.

Predicted: `predict` counts bytes from the architecture (see its docstring). It is checked against
the measurement on CPU, then used for LLaDA-8B on one 80 GB GPU (bf16 weights, L = 512): the
largest micro-batch of rows for full fine-tuning and LoRA r = 64, with and without checkpointing.
On CUDA the same iteration runs at LLaDA-8B's exact shape (random weights, bf16, L = 512) at the
predicted largest micro-batch, LoRA r = 64 and full fine-tuning, both with checkpointing: measured
peak (torch.cuda.max_memory_allocated) and time against the prediction.

    python -m benchmarks memory [--quick]      CPU (--quick: small shapes, no files); CUDA when there is a GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from atpo_fast.ops.fused_linear_logprobs import CPU_CHUNK_BYTES, CUDA_CHUNK_BYTES
from benchmarks.common import REPO, machine_info, print_table, write_results

LLADA_VOCAB = 126464
CPU_SHAPE = dict(hidden_size=256, num_heads=4, intermediate_size=704, vocab_size=LLADA_VOCAB, num_layers=4)
QUICK_SHAPE = dict(hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=4096, num_layers=2)
# prompts of 64 characters, responses of 64 tokens: rows of L = 128; 8 responses, 8 rows each, 16 per micro-batch
CPU_PLAN = dict(prompt=64, gen_length=64, block_length=32, steps=16, prompts=2, group=4, budget=8, micro=16, rank=16)
QUICK_PLAN = dict(prompt=16, gen_length=16, block_length=16, steps=8, prompts=2, group=4, budget=4, micro=8, rank=4)
LLADA_8B = dict(hidden_size=4096, num_heads=32, intermediate_size=12288, vocab_size=LLADA_VOCAB, num_layers=32)
# CUDA: prompts of 128 characters, responses of 384 tokens (L = 512), 8 responses; micro and budget are set from
# the predicted largest micro-batch of each setting
CUDA_PLAN = dict(prompt=128, gen_length=384, block_length=32, steps=48, prompts=2, group=4, rank=64)
CUDA_SETTINGS = (("lora", True), ("full", True))
GPU_BYTES = 80e9  # one 80 GB GPU
GPU_RESERVED = 3e9  # CUDA context, allocator fragmentation and workspaces, kept free
SETTINGS = (("full", False), ("full", True), ("lora", False), ("lora", True))
PHASES = ("rollout", "old_logprobs", "update")
COLUMNS = ["setting", "phase", "measured_MiB", "predicted_MiB", "error"]
MODULES_PER_LAYER = 7  # LoRA targets: q, k, v, o, gate, up, down


@dataclasses.dataclass
class Shape:
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    num_layers: int
    num_kv_heads: int | None = None

    @property
    def kv(self) -> int:
        return self.hidden_size // self.num_heads * (self.num_kv_heads or self.num_heads)

    def parameters(self) -> int:
        h, m = self.hidden_size, self.intermediate_size
        layer = 2 * h * h + 2 * h * self.kv + 3 * h * m + 2 * h
        return self.num_layers * layer + 2 * self.vocab_size * h + h

    def lora_parameters(self, rank: int) -> int:
        h, m = self.hidden_size, self.intermediate_size
        per_layer = rank * ((h + h) * 2 + (h + self.kv) * 2 + (h + m) * 3)  # A [r, in] + B [out, r] per module
        return self.num_layers * per_layer


def predict(shape: Shape, *, lora_rank: int, checkpointing: bool, batch: int, length: int, candidates: int,
            rows: int, weight_bytes: int, chunk_bytes: int, fused_optimizer: bool) -> dict[str, float]:
    """Peak bytes per phase.

    Static: weights (weight_bytes each) and AdamW's two moments of the trainable parameters, in their
    dtype (adapters are float32; full fine-tuning trains the weights' own dtype). Gradients exist
    from the backward pass to the optimizer step only.
    Update, backward peak: static + gradients + the activations kept for backward, per row-token and
    layer in the weights' dtype (a bytes): each of the two RMSNorms keeps its input in float32
    (transformers upcasts it), its normalised input (for the norm weight's gradient only, so not with
    LoRA) and its output; attention keeps q and k after RoPE, v, its output and that output made
    contiguous for o_proj (3h + 2kv); the MLP keeps gate, SiLU(gate), up and their product (4m); LoRA
    adds each adapter's rank-r intermediate (7r). With checkpointing a layer keeps its input (h) and one layer's
    activations are rebuilt during backward. The final norm keeps 3h; the LM head works in tiles of
    chunk_bytes (logits and their gradient); backward adds one layer's activation gradients (2 [rows
    * L, m] tensors). Update, optimizer-step peak: static + gradients + the step's temporaries (none
    when fused; the for-loop AdamW holds two copies of the largest parameter).
    Rollout: static + one layer's forward transient without grad (2h + 3m per token of B sequences)
    + the logits of one step's candidates [C, V] (float32). Old log-probs: static + the same transient
    for the rows + one LM-head tile.
    """
    h, m, r, layers = shape.hidden_size, shape.intermediate_size, lora_rank, shape.num_layers
    weights = shape.parameters() * weight_bytes
    trainable, state_bytes = ((shape.lora_parameters(r), 4) if r else (shape.parameters(), weight_bytes))
    largest = (max(shape.hidden_size, shape.intermediate_size) * r if r else shape.vocab_size * h) * state_bytes
    optimizer = 2 * trainable * state_bytes
    gradients = trainable * state_bytes
    a = weight_bytes
    norm = 4 * h + (0 if r else a * h) + a * h  # bytes per token: float32 input, normalised input, output
    per_token_layer = 2 * norm + a * (3 * h + 2 * shape.kv + 4 * m + MODULES_PER_LAYER * r)  # bytes
    tokens = rows * length
    layers_kept = tokens * (layers * h * a + per_token_layer) if checkpointing else tokens * layers * per_token_layer
    kept = layers_kept + tokens * norm
    backward = weights + optimizer + gradients + kept + tokens * 2 * m * a + 2 * chunk_bytes
    step = weights + optimizer + gradients + (0 if fused_optimizer else 2 * largest)
    transient = (2 * h + 3 * m) * a
    return {"rollout": weights + optimizer + batch * length * transient + candidates * shape.vocab_size * 4,
            "old_logprobs": weights + optimizer + tokens * transient + chunk_bytes,
            "update": max(backward, step), "update_backward": backward, "update_step": step,
            "weights": weights, "optimizer": optimizer, "gradients": gradients, "activations": kept}


def largest_micro_batch(shape: Shape, *, lora_rank: int, checkpointing: bool, length: int,
                        budget: float = GPU_BYTES - GPU_RESERVED) -> int:
    """The most rows of `length` tokens whose update fits in `budget` bytes (bf16 weights, CUDA tiles)."""
    def fits(rows):
        need = predict(shape, lora_rank=lora_rank, checkpointing=checkpointing, batch=rows, length=length,
                       candidates=rows * 32, rows=rows, weight_bytes=2, chunk_bytes=CUDA_CHUNK_BYTES,
                       fused_optimizer=True)
        return need["update"] <= budget
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# ----------------------------------------------------------------------------- measurement (one process per setting)


def measure(setting: str, checkpointing: bool, shape: dict, plan: dict, device: str = "cpu") -> dict:
    """Peak bytes per phase above the state before the model was built (run in a fresh process): resident
    memory on CPU, torch.cuda.max_memory_allocated on CUDA (bf16 weights there)."""
    import torch

    from atpo_fast.config import load_config
    from atpo_fast.models import TinyConfig, TinyDiffusionLM
    from atpo_fast.trainer import Trainer
    from benchmarks.bench_trainer import RandomTextTask
    from benchmarks.common import rss_bytes

    torch.manual_seed(0)
    cuda = device == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else rss_bytes("VmRSS")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # an 8B model is built on the GPU in bf16
    try:
        with torch.device(device):
            model = TinyDiffusionLM(TinyConfig(**shape, max_length=plan["prompt"] + plan["gen_length"]))
    finally:
        torch.set_default_dtype(default)
    config = load_config(None, [
        f"device={device}", f"sampler.gen_length={plan['gen_length']}", f"sampler.block_length={plan['block_length']}",
        f"sampler.steps={plan['steps']}", f"optim.prompts_per_iter={plan['prompts']}",
        f"optim.group_size={plan['group']}", f"selection.budget={plan['budget']}",
        f"optim.micro_batch_rows={plan['micro']}", "optim.lr=1e-4", "selection.rule=uniform",
        f"model.lora.rank={plan['rank'] if setting == 'lora' else 0}",
        f"model.activation_checkpointing={str(checkpointing).lower()}"])
    trainer = Trainer(config, model=model, task=RandomTextTask(plan["prompt"]))

    def collect(seed):
        """A random model's responses mostly decode alike: give every response an advantage anyway."""
        collected = trainer.collect(seed)
        collected.informative.fill_(True)
        collected.advantages.copy_(torch.randn(collected.advantages.shape))
        return collected

    warm_up = collect(0)
    trainer.update(trainer.select(warm_up, 0))  # first allocations; the optimizer state exists from here on

    def peak(fn):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() if cuda else rss_bytes("VmHWM")) - baseline, out

    result = {}
    result["rollout"], collected = peak(lambda: collect(1))
    selected = trainer.select(collected, 1)
    first = next(trainer.micro_batches(selected.rows))
    trainer.policy.eval()
    with torch.no_grad():
        result["old_logprobs"], _ = peak(lambda: trainer.row_logprobs(selected, first))
    trainer.config.optim.micro_batch_rows = first[1] - first[0]  # the update of the first micro-batch alone
    only_first = _first_micro_batch(selected, first)
    result["update"], _ = peak(lambda: trainer.update(only_first))
    for single_pass in (True, False):  # the update's time with and without the separate old-log-prob pass
        trainer.single_pass_update = single_pass
        times = []
        for _ in range(1 if cuda else 3):
            start = trainer.clock()
            trainer.update(only_first)
            times.append(trainer.clock() - start)
        result["update_s_single_pass" if single_pass else "update_s_two_pass"] = statistics.median(times)
    r0, r1, t0, t1 = first
    tokens = collected.rollout.tokens
    # the most candidates of one step: every position of a block, at its first step
    result.update(rows=r1 - r0, targets=t1 - t0, length=tokens.shape[1], batch=tokens.shape[0],
                  candidates=tokens.shape[0] * plan["block_length"])
    return result


def _first_micro_batch(selected, batch):
    """selected restricted to the rows and targets of one micro-batch."""
    from atpo_fast.ops.step_rows import StepRows

    r0, r1, t0, t1 = batch
    rows = selected.rows
    part = StepRows(rows.input_ids[r0:r1], rows.target_mask[r0:r1], rows.seq_index[r0:r1], rows.step_start[r0:r1],
                    rows.target_row[t0:t1] - r0, rows.target_pos[t0:t1], rows.target_token[t0:t1])
    return dataclasses.replace(selected, rows=part, total_rows=r1 - r0, attention=selected.attention[r0:r1],
                               token_advantage=selected.token_advantage[t0:t1])


def measure_in_worker(setting: str, checkpointing: bool, mode: str, plan: dict) -> dict:
    args = [sys.executable, "-m", "benchmarks.bench_memory", "--worker", setting, str(int(checkpointing)), mode,
            json.dumps(plan)]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker {setting} checkpointing={checkpointing} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, no result files")
    parser.add_argument("--worker", nargs=4, metavar=("SETTING", "CHECKPOINTING", "MODE", "PLAN"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shapes = {"quick": QUICK_SHAPE, "cpu": CPU_SHAPE, "cuda": LLADA_8B}
    if args.worker:
        setting, checkpointing, mode, plan = args.worker
        print(json.dumps(measure(setting, bool(int(checkpointing)), shapes[mode], json.loads(plan),
                                 "cuda" if mode == "cuda" else "cpu")))
        return []
    mode = "quick" if args.quick else "cuda" if torch.cuda.is_available() else "cpu"
    shape = shapes[mode]
    cuda = mode == "cuda"
    table, times, model = [], [], Shape(**shape)
    for setting, checkpointing in CUDA_SETTINGS if cuda else SETTINGS:
        plan = {"quick": QUICK_PLAN, "cpu": CPU_PLAN, "cuda": CUDA_PLAN}[mode]
        rank = plan["rank"] if setting == "lora" else 0
        if cuda:  # the predicted largest micro-batch, and a budget that makes at least that many rows
            micro = largest_micro_batch(model, lora_rank=rank, checkpointing=checkpointing, length=512)
            plan = dict(plan, micro=micro, budget=-(-micro // (plan["prompts"] * plan["group"])) + 1)
        got = measure_in_worker(setting, checkpointing, mode, plan)
        want = predict(model, lora_rank=rank, checkpointing=checkpointing, batch=got["batch"], length=got["length"],
                       candidates=got["candidates"], rows=got["rows"], weight_bytes=2 if cuda else 4,
                       chunk_bytes=CUDA_CHUNK_BYTES if cuda else CPU_CHUNK_BYTES, fused_optimizer=cuda)
        name = f"{setting}{' + checkpointing' if checkpointing else ''}"
        for phase in PHASES:
            table.append({"setting": name, "phase": phase, "measured_MiB": got[phase] / 2**20,
                          "predicted_MiB": want[phase] / 2**20, "error": want[phase] / got[phase] - 1})
        times.append({"setting": name, "rows": got["rows"], "L": got["length"],
                      "update_s_single_pass": got["update_s_single_pass"],
                      "update_s_two_pass": got["update_s_two_pass"],
                      "two_pass_over_single": got["update_s_two_pass"] / got["update_s_single_pass"]})
        print(f"{name}: rows {got['rows']} x L {got['length']}", flush=True)
    print_table(COLUMNS, table)
    time_columns = ["setting", "rows", "L", "update_s_single_pass", "update_s_two_pass", "two_pass_over_single"]
    print_table(time_columns, times)
    llada = Shape(**LLADA_8B)
    fits = [{"model": "LLaDA-8B", "setting": f"{s}{' + checkpointing' if c else ''}", "L": 512,
             "largest_micro_batch_rows": largest_micro_batch(llada, lora_rank=64 if s == "lora" else 0,
                                                             checkpointing=c, length=512)}
            for s, c in SETTINGS]
    print_table(["model", "setting", "L", "largest_micro_batch_rows"], fits)
    if not args.quick:
        measured = (f"LLaDA-8B's exact shape {shape} with random weights, bf16, run {CUDA_PLAN} at the predicted "
                    f"largest micro-batch" if cuda else
                    f"model {shape}, run {CPU_PLAN} (LoRA rank {CPU_PLAN['rank']}), float32 on CPU")
        notes = (f"Measured: {measured}; the update is that of one micro-batch. Predicted by "
                 f"benchmarks/bench_memory.predict. LLaDA-8B: bf16 weights, "
                 f"{llada.parameters() / 1e9:.2f}e9 parameters, LoRA r=64 on the 7 projections "
                 f"({llada.lora_parameters(64) / 1e6:.0f}e6), budget {GPU_BYTES / 1e9:.0f} GB minus "
                 f"{GPU_RESERVED / 1e9:.0f} GB reserved.\n\n"
                 + "| model | setting | L | largest_micro_batch_rows |\n|---|---|---|---|\n"
                 + "".join(f"| {f['model']} | {f['setting']} | {f['L']} | {f['largest_micro_batch_rows']} |\n"
                           for f in fits)
                 + "\nUpdate time of one micro-batch (median of 3 on CPU, one run on CUDA), single pass "
                 "(updates_per_batch = 1: the old log-probs are the update forward's own) against a separate "
                 "no-grad pass first:\n\n"
                 + "| " + " | ".join(time_columns) + " |\n" + "|---" * len(time_columns) + "|\n"
                 + "".join("| " + " | ".join(f"{t[c]:.3g}" if isinstance(t[c], float) else str(t[c])
                                             for c in time_columns) + " |\n" for t in times))
        write_results("memory", "Memory of one training iteration: measured by phase and predicted", COLUMNS,
                      table, machine_info(), notes)
    return table


if __name__ == "__main__":
    main()
