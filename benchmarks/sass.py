"""Compile report: every Triton specialisation the public ops launch, compiled for real GPUs, no GPU needed.

    python -m benchmarks sass                 # table under benchmarks/results/, exit 1 on any compile error
    python -m benchmarks sass --quick         # fewer shapes (the CI test), no result files
    PYTHONPATH=.cache/triton-3.6 python -m benchmarks sass --quick    # the same under Triton 3.6

How: the public ops run on empty CPU tensors with every kernel launch recorded instead of executed
(inputs are never read, so any size is cheap) and with the launch layout a 132-multiprocessor GPU
would get. Each distinct specialisation is bound the way the JIT binder binds
a real launch (argument types, divisibility by 16, integers equal to 1) and compiled with
`triton.compile` for sm_90 and sm_80. The cubin's resource usage comes from cuobjdump and its SASS
from nvdisasm, both shipped in Triton's wheel.

Per specialisation: registers, spill bytes, shared memory, and for the vocabulary loop (the first
innermost loop that loads from global memory: the whole tiles, not the row's last partial one):
SASS instructions per element (thread-instructions in one pass of the loop body over the elements
a thread loads in it: BLOCK_V / threads per tile, times the tiles the compiler unrolled into one
pass) on the steady path, which leaves out the blocks that forward conditional branches skip (a
running max that grew), and over the whole body (static); barriers per tile, and the widest
global load.
An H100 keeps up with its memory below ~22 instructions per bf16 element (~15 on an H200).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels must be JITFunctions, not interpreted ones
    os.execve(sys.executable, [sys.executable, "-m", "benchmarks", "sass", *sys.argv[2:]],
              {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from atpo_fast import fused_linear_logprobs, selected_logprobs, token_stats  # noqa: E402
import atpo_fast.kernels  # noqa: E402
from atpo_fast.kernels import utils as kernel_utils  # noqa: E402
from atpo_fast.ops.fused_linear_logprobs import CUDA_CHUNK_BYTES  # noqa: E402
from benchmarks.common import RESULTS_DIR, machine_info, print_table, write_results  # noqa: E402

SM_COUNT = 132  # the launch layout of an H100 / H200
VOCABS = (126464, 152064, 50257)  # LLaDA, Dream/Qwen2, an unaligned one (GPT-2)
ROWS = (1, 64, 4096, 16384)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ARCHS = (90, 80)
NO_VOCABULARY_LOOP = {"_merge_kernel"}  # its loops rescan one lane group of a row, a few columns per thread


@dataclass
class Launch:
    """One recorded kernel launch: the kernel and the arguments it was called with."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    calls: list = field(default_factory=list)  # the op calls that launched this specialisation


def record_launches(workloads) -> dict[tuple, Launch]:
    """Run each workload (name, zero-argument callable) with launches recorded, not executed.

    Returns the distinct specialisations, keyed by (kernel name, the binder's specialisation).
    """
    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders: dict[int, object] = {}
    launches: dict[tuple, Launch] = {}
    current = [""]
    patched = {(JITFunction, "run"): None, (kernel_utils, "target_programs"): None,
               (atpo_fast.kernels, "interpreter_enabled"): None}

    def record(self, *args, grid, warmup, **kwargs):
        binder = binders.setdefault(id(self), create_function_from_signature(self.signature, self.params, backend))
        _, specialization, options = binder(*args, **kwargs)
        key = (self.fn.__name__, repr(specialization), repr(sorted(options.items())))
        launches.setdefault(key, Launch(self, args, kwargs)).calls.append(current[0])

    replacements = [record, lambda device, programs_per_sm=8: programs_per_sm * SM_COUNT, lambda: True]
    for (owner, name), new in zip(patched, replacements):
        patched[(owner, name)] = getattr(owner, name)
        setattr(owner, name, new)
    try:
        for name, fn in workloads:
            current[0] = name
            fn()
    finally:
        for (owner, name), old in patched.items():
            setattr(owner, name, old)
    return launches


def compile_launch(launch: Launch, arch: int):
    """triton.compile the launch's specialisation for sm_<arch>; returns the CompiledKernel."""
    jit = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, dict(launch.kwargs), bound_args, specialization,
                                                           options)
    return triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__), \
        {jit.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict:
    """Registers, spill bytes and static shared memory of the cubin's kernel (cuobjdump -res-usage)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(found.get("REG", 0)), "stack_bytes": int(found.get("STACK", 0)),
            "local_bytes": int(found.get("LOCAL", 0))}


def sass_lines(cubin: bytes) -> list[tuple[str, str]]:
    """(label or '', instruction text) for every SASS instruction of the cubin, in order (nvdisasm)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("nvdisasm"), "-c", "-hex", f.name], capture_output=True, text=True,
                              check=True).stdout
    lines, label = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if re.match(r"^\.?L\w*:", stripped) or re.match(r"^\.L_x_\d+:", stripped):
            label = stripped.rstrip(":")
            continue
        match = re.match(r"^/\*[0-9a-f]+\*/\s+(.*?)\s*;", stripped)
        if match:
            lines.append((label, match.group(1)))
            label = ""
    return lines


def main_loop(lines: list[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The vocabulary loop: (body, steady); empty lists if there is none.

    A loop is a branch back to an earlier label; the vocabulary loop is the first innermost one (no
    other loop inside it) with a global load (a pass that samples rescans one lane group in loops
    after it). `steady` leaves out the blocks a forward conditional branch inside the body skips (the
    rare paths: a running max that grew, the row's last tile), so it is what a typical tile runs.
    """
    labels = {label: i for i, (label, _) in enumerate(lines) if label}
    loops = []
    for i, (_, ins) in enumerate(lines):
        match = re.search(r"\bBRA\b.*?(\.L\w+)", ins)
        if match and match.group(1) in labels and labels[match.group(1)] <= i:
            start = labels[match.group(1)]
            if any(re.search(r"\bLDG\b", text) for _, text in lines[start:i + 1]):
                loops.append((start, i))
    innermost = [(start, end) for start, end in loops
                 if not any(start <= inner < end and (inner, inner_end) != (start, end) and inner_end <= end
                            for inner, inner_end in loops)]
    if not innermost:
        return [], []
    start, end = min(innermost)
    body = [text for _, text in lines[start:end + 1]]
    steady, skip_to = [], None
    for k in range(start, end + 1):
        label, text = lines[k]
        if skip_to is not None and label == skip_to:
            skip_to = None
        if skip_to is not None:
            continue
        steady.append(text)
        match = re.match(r"@!?U?P\d\s+BRA\b.*?(\.L\w+)", text)
        if match and match.group(1) in labels and k < labels[match.group(1)] <= end:
            skip_to = match.group(1)
    return body, steady


def _opcode(instruction: str) -> str:
    """The opcode of a SASS instruction, without its predicate: '@!P0 LDG.E.128 R4, ...' -> 'LDG.E.128'."""
    words = instruction.split()
    return words[1] if words and words[0].startswith("@") else (words[0] if words else "")


def _barriers(instructions) -> int:
    """How many of the SASS instruction texts are barriers (BAR.SYNC and its kin)."""
    return sum(_opcode(t).startswith("BAR") for t in instructions)


def load_bits(opcode: str) -> int:
    """Width of a global load: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E (32-bit) -> 32."""
    sizes = [int(size) for size in re.findall(r"\.U?(8|16|32|64|128)\b", opcode)]
    return max(sizes) if sizes else 32


def analyze(launch: Launch, arch: int) -> dict:
    """One row of the report for one specialisation on one architecture."""
    name = launch.kernel.fn.__name__
    row = {"kernel": name, "arch": f"sm_{arch}", "calls": ", ".join(sorted(set(launch.calls))[:3])}
    try:
        compiled, constexprs = compile_launch(launch, arch)
    except Exception as error:  # noqa: BLE001 - the report's purpose: say which specialisation fails and why
        row.update(status="ERROR", error=f"{type(error).__name__}: {str(error).splitlines()[0][:160]}")
        return row
    meta = compiled.metadata
    cubin = compiled.asm["cubin"]
    lines = sass_lines(cubin)
    body, steady = main_loop(lines) if name not in NO_VOCABULARY_LOOP else ([], [])
    row.update(status="ok", **resource_usage(cubin), shared_bytes=meta.shared, num_warps=meta.num_warps,
               kernel_instructions=len(lines), kernel_barriers=_barriers(t for _, t in lines),
               flags=" ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in sorted(constexprs.items())
                              if k != "BLOCK_V"))
    if body:
        loads = [load_bits(_opcode(t)) for t in body if _opcode(t).startswith("LDG")]
        tile_elements = max(constexprs["BLOCK_V"] / (32 * meta.num_warps), 1)  # a thread's share of one tile
        # the logits (every vocabulary kernel's first argument) a thread loads in one pass: one tile, or the
        # tiles the compiler unrolled into it
        tiles = max(1, round(sum(loads) / (tile_elements * launch.args[0].element_size() * 8)))
        per_thread = tile_elements * tiles
        row.update(BLOCK_V=constexprs["BLOCK_V"], tiles_per_pass=tiles,
                   instructions_per_element=len(steady) / per_thread, static_per_element=len(body) / per_thread,
                   barriers_per_tile=_barriers(steady) / tiles,
                   load_bits=max(loads))
    return row


def workloads(quick: bool):
    """(name, callable) for every public-op call the report covers; inputs are empty (never read)."""
    vocabs = VOCABS[:1] + VOCABS[2:] if quick else VOCABS
    shapes = [(1, torch.bfloat16), (4096, torch.bfloat16), (4096, torch.float32)] if quick else \
        [(rows, dtype) for rows in ROWS for dtype in DTYPES]
    for vocab in vocabs:
        for rows, dtype in shapes:
            tag = f"N={rows} V={vocab} {str(dtype).split('.')[-1]}"

            def logits(rows=rows, vocab=vocab, dtype=dtype, grad=False):
                return torch.empty(rows, vocab, dtype=dtype).requires_grad_(grad)

            targets = torch.zeros(rows, dtype=torch.long)
            yield f"token_stats T=0 {tag}", lambda lg=logits: token_stats(lg(), backend="triton")
            yield f"token_stats T=1 {tag}", lambda lg=logits: token_stats(lg(), temperature=1.0, seed=0,
                                                                          backend="triton")
            yield f"token_stats T=0.7 {tag}", lambda lg=logits: token_stats(lg(), temperature=0.7, seed=0,
                                                                            backend="triton")
            yield f"token_stats targets {tag}", lambda lg=logits, t=targets: token_stats(lg(), targets=t,
                                                                                         backend="triton")
            yield f"selected_logprobs fwd+bwd {tag}", \
                lambda lg=logits, t=targets: selected_logprobs(lg(grad=True), t, backend="triton").sum().backward()
        # the LM-head tiles of fused_linear_logprobs, as CUDA chunks them (a small hidden size: the GEMMs run)
        for dtype in (torch.bfloat16,) if quick else DTYPES:
            def fused(vocab=vocab, dtype=dtype):
                hidden = torch.zeros(4096, 8, dtype=dtype, requires_grad=True)
                weight = torch.zeros(vocab, 8, dtype=dtype, requires_grad=True)
                fused_linear_logprobs(hidden, weight, torch.zeros(4096, dtype=torch.long), backend="triton",
                                      chunk_bytes=CUDA_CHUNK_BYTES).sum().backward()

            yield f"fused_linear_logprobs fwd+bwd N=4096 V={vocab} D=8 {str(dtype).split('.')[-1]}", fused


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks sass", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and sm_90 only; no result files")
    return parser.parse_args(argv)


COLUMNS = ["kernel", "arch", "status", "flags", "num_warps", "BLOCK_V", "registers", "stack_bytes", "local_bytes",
           "shared_bytes", "tiles_per_pass", "instructions_per_element", "static_per_element", "barriers_per_tile",
           "load_bits", "kernel_instructions", "kernel_barriers", "calls", "error"]


def main(argv=None) -> int:
    args = parse_args(argv)
    launches = record_launches(workloads(args.quick))
    archs = ARCHS[:1] if args.quick else ARCHS
    jobs = [(launch, arch) for arch in archs for launch in launches.values()]
    table = [analyze(launch, arch) for launch, arch in tqdm(jobs, desc="compiling", unit="kernel")]
    counts = collections.Counter(row["status"] for row in table)
    print_table(COLUMNS, table)
    print(f"triton {triton.__version__}: {len(launches)} specialisations x {len(archs)} archs: "
          f"{counts['ok']} compiled, {counts['ERROR']} failed")
    if not args.quick:
        meta = {**machine_info(), "triton": triton.__version__}
        name = "sass_triton" + triton.__version__.replace(".", "_")
        write_results(name, f"Compile report (Triton {triton.__version__})", COLUMNS, table, meta, NOTES,
                      results_dir=RESULTS_DIR)
    return 1 if counts["ERROR"] else 0


NOTES = ("Every specialisation the public ops launched for the shapes in benchmarks/sass.py, compiled for "
         "sm_90 and sm_80 without a GPU. The vocabulary loop: the first innermost loop with a global load (the "
         "whole tiles). instructions_per_element: SASS thread-instructions of its body divided by the elements "
         "one thread loads per pass (BLOCK_V / threads times tiles_per_pass, the tiles the compiler unrolled "
         "into one pass); an H100 keeps up with its memory below ~22 per bf16 element (~15 on an H200). "
         "barriers_per_tile: BAR instructions in that body per tile. load_bits: the widest global load in it "
         "(128 = 16-byte vector loads). kernel_instructions and kernel_barriers: the whole kernel's SASS, once (the "
         "work around the loop: a row's merge and, when sampling, its draw, which every program of a wave runs "
         "after the loops end together). The merge kernel has no vocabulary loop.")


if __name__ == "__main__":
    sys.exit(main())
