"""Rollout wall time with the block KV caches: generate(cache="none" | "prefix" | "dual") in one run.

A bidirectional model with LLaDA's vocabulary and random weights (no download): on CPU 8 layers of
width 1024, B = 4, prompt 128, gen 256, block 32, 256 steps; on CUDA LLaDA-8B's exact shape in
bf16, batch 64, 64 steps. Each mode runs twice, in mirrored order (none, prefix, dual, dual, prefix,
none), so that a machine whose speed drifts during the run (as this project's CPU machine did by 15-32%)
weighs on every mode alike. Reported per mode: wall time (the mean of its two runs, and both), speed-up
over "none", response tokens per second, and the share of response tokens equal to the exact ("none")
rollout's (greedy, the same prompts); also the time inside the LM head (the same rows in every mode: the
caches cannot shorten it), the speed-up of everything else, the decoder layers' matrix work against
none's and the speed-up that work allows (work_bound).
Then what the approximation costs on the default job: held-out greedy accuracy and token agreement
of the warm-started tiny model on sudoku4, per mode. Last, how off-policy the caches make training:
a few atpo-train iterations of the default job (one block) and of the zones setting (3 blocks) per
mode, each iteration's rollout_logprob_gap (mean |log p at rollout - log p_old| over the trained targets).

    python -m benchmarks rollout [--quick]        all three parts (on a GPU the speed part alone)
    python -m benchmarks.bench_rollout --task     the default-job part alone (a few minutes on CPU)
    python -m benchmarks.bench_rollout --gap      the training part alone (3 minutes on 2 CPU cores, warm starts cached)
    python -m benchmarks.bench_rollout --speed --dtype bfloat16   the speed part alone, in bf16 (on CPU: rollout_bf16)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from atpo_fast import generate
from atpo_fast.config import TinyConfig
from atpo_fast.models import TinyDiffusionLM
from benchmarks.common import REPO, machine_info, print_table, write_results

LLADA_VOCAB = 126464
MODES = ("none", "prefix", "dual")
CPU = dict(width=1024, layers=8, heads=16, mlp=2816, batch=4, prompt=128, gen=256, block=32, steps=256)
# on CUDA 64 steps (4 tokens a step) keep the three modes, twice each, inside one device call (about 160 s on an
# H200 by rollout_cuda_2026-11-27_run2); tokens/s compare alike
CUDA = dict(width=4096, layers=32, heads=32, mlp=12288, batch=64, prompt=128, gen=256, block=32, steps=64)
QUICK = dict(width=128, layers=2, heads=4, mlp=256, batch=2, prompt=16, gen=64, block=16, steps=64)
COLUMNS = ["mode", "wall_s", "runs_s", "speedup", "tokens_per_s", "agreement", "head_s", "speedup_without_head",
           "layer_work", "work_bound", "shape"]
TASK_COLUMNS = ["mode", "cache_refresh", "wall_s", "accuracy", "agreement"]
QUICK_TASK = ["model.tiny={hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, max_length: 40}",
              "warmstart.steps=10", "warmstart.batch_size=8", "task.options={train_size: 100, test_size: 20}"]
TASK_MODES = (("none", None), ("prefix", None), ("dual", None), ("prefix", 2), ("dual", 2), ("prefix", 4))
GAP_COLUMNS = ["setting", "mode", "rollout_s", "speedup", "reward", "logprob_gap", "gap_by_iteration"]
GAP_SETTINGS = ("tiny", "zones")  # configs/<name>.yaml: the default job (gen 16, one block), 3 blocks of 32
GAP_RUN = ["device=cpu", "optim.iterations=4", "eval.size=20", "eval.pass_k=0"]


def timed_head(model, device: str) -> list[float]:
    """Make model.head_logits add its wall time to the returned one-element list (synchronised on CUDA)."""
    spent = [0.0]
    head = model.head_logits

    def timed(*args, **kwargs):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        logits = head(*args, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - start
        return logits

    model.head_logits = timed
    return spent


def counted_linear_work(model) -> list[int]:
    """Make every nn.Linear of model.backbone add its multiply-adds (rows x in x out) to the returned
    one-element list: the matrix work of the decoder layers, which the caches shorten (the head is timed apart)."""
    work = [0]

    def count(module, inputs, _output):
        work[0] += inputs[0].numel() * module.out_features

    for module in model.backbone.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(count)
    return work


def rollout_times(shape: dict, device: str, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    config = TinyConfig(hidden_size=shape["width"], num_layers=shape["layers"], num_heads=shape["heads"],
                        intermediate_size=shape["mlp"], max_length=shape["prompt"] + shape["gen"],
                        vocab_size=LLADA_VOCAB)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # an 8B model is built on the GPU in bf16, not on the CPU in float32
    try:
        with torch.device(device):
            model = TinyDiffusionLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    prompt = torch.randint(4, 4 + len(config.chars), (shape["batch"], shape["prompt"]), device=device)
    kwargs = dict(gen_length=shape["gen"], block_length=shape["block"], steps=shape["steps"], temperature=0.0)
    generate(model, prompt[:, :8], **{**kwargs, "gen_length": shape["block"], "steps": 2})  # warm-up
    head, work = timed_head(model, device), counted_linear_work(model)
    walls, heads, works, agreement, exact = {}, {}, {}, {}, None
    for mode in MODES + MODES[::-1]:  # each mode twice, in mirrored order: a steady drift of the machine's speed
        if device == "cuda":         # within the run weighs on every mode alike
            torch.cuda.synchronize()
        head[0] = work[0] = 0
        start = time.perf_counter()
        rollout = generate(model, prompt, cache=mode, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        exact = rollout.response if exact is None else exact
        walls.setdefault(mode, []).append(wall)
        heads.setdefault(mode, []).append(head[0])
        works[mode] = work[0]
        agreement.setdefault(mode, (rollout.response == exact).float().mean().item())
        print(f"{mode}: {wall:.2f} s", flush=True)
    results = []
    for mode in MODES:
        wall = sum(walls[mode]) / 2
        results.append({"mode": mode, "wall_s": wall, "tokens_per_s": exact.numel() / wall,
                        "agreement": agreement[mode], "head_s": sum(heads[mode]) / 2,
                        "runs_s": " / ".join(f"{w:.4g}" for w in walls[mode])})
    none_wall, none_rest = results[0]["wall_s"], results[0]["wall_s"] - results[0]["head_s"]
    for row in results:
        row["speedup"] = none_wall / row["wall_s"]
        row["speedup_without_head"] = none_rest / (row["wall_s"] - row["head_s"])
        row["layer_work"] = works[row["mode"]] / works["none"]
        # the speed-up if all but the head scaled with the layers' matrix work: an upper bound, since the
        # steps' fixed costs (token_stats, the commit) and the smaller GEMMs' lower speed do not shrink with it
        row["work_bound"] = none_wall / (none_rest * row["layer_work"] + row["head_s"])
        row["shape"] = (f"L={shape['layers']} d={shape['width']} V={LLADA_VOCAB} B={shape['batch']} "
                        f"prompt={shape['prompt']} gen={shape['gen']} block={shape['block']} steps={shape['steps']} "
                        f"{str(dtype).removeprefix('torch.')}")
    return results


def default_task(size: int, overrides: list[str] = ()) -> list[dict]:
    """What the approximation costs on the default job: the warm-started tiny model (atpo-train's
    start, from its cache) on held-out sudoku4 puzzles, greedy, per cache mode and refresh: accuracy
    and the share of response tokens equal to the exact rollout's."""
    from atpo_fast.config import load_config
    from atpo_fast.trainer import Trainer
    from atpo_fast.warmstart import warm_start

    trainer = Trainer(load_config(None, ["device=cpu", *overrides]))
    warm_start(trainer.model, trainer.task, trainer.config, trainer.device, progress=False)
    examples = trainer.task.test[:size]
    rows, exact = [], None
    for mode, refresh in TASK_MODES:
        trainer.config.sampler.cache, trainer.config.sampler.cache_refresh = mode, refresh
        start = time.perf_counter()
        rollout = trainer.rollout(examples, 1, 0.0, seed=0)
        wall = time.perf_counter() - start
        _, correct = trainer.score(examples, 1, rollout)
        exact = rollout.response if exact is None else exact
        rows.append({"mode": mode, "cache_refresh": refresh or "-", "wall_s": wall,
                     "accuracy": correct.float().mean().item(),
                     "agreement": (rollout.response == exact).float().mean().item()})
        print(f"{mode} refresh {refresh}: accuracy {rows[-1]['accuracy']:.3f}", flush=True)
    return rows


def training_gap(settings: tuple[str, ...], overrides: list[str]) -> list[dict]:
    """How off-policy each cache mode makes training: atpo-train (configs/<setting>.yaml with overrides, the same
    seed and warm start) per setting and mode; per run the mean rollout time, reward and rollout_logprob_gap
    over its iterations, and each iteration's gap."""
    from atpo_fast.config import load_config
    from atpo_fast.run import METRICS, read_metrics, train

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for setting in settings:
            for mode in MODES:
                config = load_config(REPO / "configs" / f"{setting}.yaml",
                                     [*overrides, f"sampler.cache={mode}", f"logging.run_dir={folder}",
                                      f"logging.name={setting}_{mode}"])
                run_dir = Path(train(config, progress=False)["run_dir"])
                history = [row for row in read_metrics(run_dir / METRICS) if "rollout_logprob_gap" in row]
                gaps = [row["rollout_logprob_gap"] for row in history]
                rows.append({"setting": setting, "mode": mode,
                             "rollout_s": sum(row["rollout_time"] for row in history) / len(history),
                             "reward": sum(row["reward"] for row in history) / len(history),
                             "logprob_gap": sum(gaps) / len(gaps),
                             "gap_by_iteration": " / ".join(f"{gap:.3g}" for gap in gaps)})
                print(f"{setting} {mode}: rollout_logprob_gap {rows[-1]['logprob_gap']:.4f}", flush=True)
            exact = rows[-len(MODES)]["rollout_s"]
            for row in rows[-len(MODES):]:
                row["speedup"] = exact / row["rollout_s"]
    return rows


def main(quick: bool, speed: bool = True, task: bool | None = None, gap: bool | None = None,
         dtype: torch.dtype | None = None) -> None:
    """task, gap: the default-job and training parts; by default only without a GPU (CPU measures: a GPU's time
    goes to speed). dtype: the speed part's model, bfloat16 on CUDA and float32 on CPU by default."""
    device = "cuda" if torch.cuda.is_available() and not quick else "cpu"
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    task = device == "cpu" if task is None else task
    gap = device == "cpu" if gap is None else gap
    if speed:
        shape = QUICK if quick else (CUDA if device == "cuda" else CPU)
        table = rollout_times(shape, device, dtype)
        print_table(COLUMNS, table)
        if not quick:
            notes = ("Greedy rollouts of one random-weight bidirectional model with LLaDA's vocabulary, the three "
                     "cache modes in one process, each twice in mirrored order (none, prefix, dual, dual, prefix, "
                     "none): wall_s and head_s are the means of its two runs (runs_s). agreement: share of response "
                     "tokens equal to the cache='none' rollout's. head_s: wall time inside the LM head (the masked "
                     "positions of the block, alike in every mode); speedup_without_head: the speed-up of the rest. "
                     "layer_work: the decoder layers' matrix multiply-adds (every nn.Linear of the backbone, counted "
                     "by hooks) against none's; work_bound: the speed-up if everything but the head took none's time "
                     "times layer_work, an upper bound (a step's fixed costs do not shrink with the work).")
            # a CPU run in bfloat16 (oneDNN's AMX matrix units, where the CPU has them) gets a file of its own
            name = "rollout_bf16" if device == "cpu" and dtype == torch.bfloat16 else "rollout"
            write_results(name, "Rollouts with block KV caches", COLUMNS, table, machine_info(), notes)
    if task:
        size = 20 if quick else 200
        table = default_task(size, QUICK_TASK if quick else [])
        print_table(TASK_COLUMNS, table)
        if not quick:
            notes = (f"The default job's starting point (the warm-started tiny model, sudoku4, gen 16 in one block of "
                     f"16, 16 steps), greedy on {size} held-out puzzles, per cache mode; cache_refresh n remakes "
                     f"the block cache every n steps; agreement: share of response tokens equal to the exact "
                     f"rollout's. Wall times are CPU, one process.")
            write_results("rollout_task", "What the block KV caches cost on the default job", TASK_COLUMNS,
                          table, machine_info(), notes)
    if gap:
        table = training_gap(("tiny",) if quick else GAP_SETTINGS,
                             GAP_RUN + (QUICK_TASK + ["optim.iterations=1"] if quick else []))
        print_table(GAP_COLUMNS, table)
        if not quick:
            notes = ("atpo-train with configs/<setting>.yaml and " + " ".join(GAP_RUN) + " per cache mode (the same "
                     "seed, warm start and prompts): tiny is the default job (sudoku4, gen 16 in one block of 16, 16 "
                     "steps), zones 3 blocks of 32 (48 steps). logprob_gap: the runs' mean rollout_logprob_gap, the "
                     "mean |log p at rollout - log p_old| over the trained targets (how far off-policy the rollout "
                     "makes the update; with cache none and one-step rows, rounding alone); rollout_s and reward: "
                     "the means over the iterations; speedup: rollout time against none's. After the first "
                     "iteration the runs' policies differ, so later iterations compare modes on different models.")
            write_results("rollout_gap", "How off-policy the block KV caches make training", GAP_COLUMNS,
                          table, machine_info(), notes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, no result files")
    parser.add_argument("--task", action="store_true", help="only the default-job part")
    parser.add_argument("--gap", action="store_true", help="only the training part")
    parser.add_argument("--speed", action="store_true", help="only the speed part")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="the speed part's model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args()
    only = args.task or args.gap or args.speed
    main(args.quick, speed=args.speed or not only, task=args.task if only else None, gap=args.gap if only else None,
         dtype=getattr(torch, args.dtype) if args.dtype else None)
