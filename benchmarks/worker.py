"""Peak memory of one CPU benchmark case, in a process of its own: python -m benchmarks.worker MODULE CASE VARIANT."""

import argparse
import importlib
import json

from benchmarks.common import peak_extra_bytes

parser = argparse.ArgumentParser()
parser.add_argument("module")
parser.add_argument("case")
parser.add_argument("variant")
parser.add_argument("--quick", action="store_true")
args = parser.parse_args()
_, build = importlib.import_module(f"benchmarks.{args.module}").cpu_cases(args.quick)[args.case]
fn = build()[args.variant]
print(json.dumps({"peak_extra_bytes": peak_extra_bytes(fn)}))
