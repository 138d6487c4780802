"""Console scripts: atpo-train (the main job), atpo-eval and atpo-export.

    atpo-train                                  tiny model, sudoku4, warm start + ATPO on this CPU
    atpo-train selection.rule=uniform seed=1    any config key as section.key=value
    atpo-train --config configs/llada.yaml --model /path/to/LLaDA-8B-Instruct --task jsonl --data x.jsonl
    atpo-train --name my-run --resume           continue a run from its last checkpoint
    torchrun --nproc_per_node 8 --no-python atpo-train ...   data parallel over 8 GPUs (distributed.strategy)
    atpo-eval runs/sudoku4-hybrid-seed0         held-out accuracy of a run's checkpoint
    atpo-export runs/NAME OUT [--merge]         a run's adapters in peft's format, or the merged model (on the CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from atpo_fast.config import CONFIG, load_config


def _parser(prog: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def positive_int(text: str) -> int:
    """An argparse type: an int >= 1 (argparse names the option when this raises); the benchmarks' options too."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expects an int >= 1, got {text!r}")
    return value


def parse_train_args(argv: list[str]):
    parser = _parser("atpo-train")
    parser.add_argument("--config", help="YAML run config (default: the built-in tiny CPU setting)")
    parser.add_argument("--model", help="local folder of model weights (sets model.path)")
    parser.add_argument("--task", help="task name (sets task.name)")
    parser.add_argument("--data", help="data file of the jsonl task (sets task.data)")
    parser.add_argument("--name", help="run name (sets logging.name)")
    parser.add_argument("--resume", action="store_true", help="continue the named run from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    for flag, key in (("model", "model.path"), ("task", "task.name"), ("data", "task.data"), ("name", "logging.name")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={json.dumps(getattr(args, flag))}")
    config = load_config(args.config, overrides)
    saved = config.run_folder() / CONFIG
    if args.resume and args.config is None and saved.is_file():  # the run's own config, the overrides over it
        config = load_config(saved, overrides)
    return args, config


def _how_to_resume(config) -> str:
    if config is None:
        return ""
    folder = config.run_folder()
    return (f"; once a checkpoint is written, `atpo-train --resume --name {folder.name} logging.run_dir={folder.parent}`"
            f" continues from it")


def train_main(argv: list[str] | None = None) -> int:
    config = None
    try:
        args, config = parse_train_args(sys.argv[1:] if argv is None else argv)
        from atpo_fast.run import train

        summary = train(config, resume=args.resume, progress=not args.quiet)
    except ValueError as err:
        print(f"atpo-train: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: say how to continue instead of a traceback
        print(f"atpo-train: interrupted{_how_to_resume(config)}", file=sys.stderr)
        return 130
    except OSError as err:  # a full disk, a lost mount: checkpoints are atomic, so the run can go on once it is fixed
        print(f"atpo-train: error: {err}{_how_to_resume(config)}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    before, after = summary["before"], summary["after"]
    print(f"held-out accuracy (greedy): before {before['accuracy']:.3f} -> after {after['accuracy']:.3f}")
    for key in sorted(k for k in after if k.startswith("pass@")):
        print(f"held-out {key}: before {before[key]:.3f} -> after {after[key]:.3f}")
    print(f"held-out mean reward: before {before['reward']:.3f} -> after {after['reward']:.3f}")
    if summary["stopped"]:
        print(f"run {summary['stopped']}; the last good checkpoint is kept")
    print(f"run folder: {summary['run_dir']} (metrics.jsonl, config.yaml, checkpoint/, summary.json, *.png)")
    return 0


def _leave_process_group() -> None:
    dist = sys.modules.get("torch.distributed")  # not imported: no group to leave (and no torch import to pay)
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def eval_main(argv: list[str] | None = None) -> int:
    parser = _parser("atpo-eval")
    parser.add_argument("run_dir", help="a run folder (holding config.yaml and checkpoint/)")
    parser.add_argument("--size", type=positive_int, help="number of held-out problems (default: eval.size)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        from atpo_fast.checkpoint import load_run

        trainer = load_run(args.run_dir, args.overrides)
        result, _ = trainer.evaluate(args.size)
    except ValueError as err:
        print(f"atpo-eval: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the environment's (an unreadable file), not a bug
        print(f"atpo-eval: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": args.run_dir, "iteration": trainer.iteration, **result}, indent=2))
    return 0


def export_main(argv: list[str] | None = None) -> int:
    from atpo_fast import export

    parser = argparse.ArgumentParser(prog="atpo-export", description=export.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run folder (holding config.yaml and checkpoint/)")
    parser.add_argument("out", help="the folder to write (new or empty)")
    parser.add_argument("--merge", action="store_true", help="merge LoRA adapters into the base and write it whole")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides (model.path=..., for a base folder that moved)")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        written = export.export_run(args.run_dir, args.out, merge=args.merge, overrides=args.overrides)
    except ValueError as err:
        print(f"atpo-export: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a lost mount
        print(f"atpo-export: error: {err}", file=sys.stderr)
        return 1
    print(f"atpo-export: wrote the {written} of {args.run_dir} to {args.out}")
    return 0
