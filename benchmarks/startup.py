"""Interpreter-start cost of the plugin's .pth hook (target: <= 10 ms at `python -c pass`).

The hook's whole start-up work is importing ``simpletuner_longcat_video._autoload`` (it installs
one meta-path finder and imports nothing heavy), so its cost is that module's cumulative time in
``-X importtime`` (median of N fresh interpreters). The whole-process wall clock of
``python -c pass`` is printed for context.

Usage: python benchmarks/startup.py [--runs 30]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import time

HOOK = "simpletuner_longcat_video._autoload"


def hook_import_us() -> int:
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    for line in out.splitlines():
        match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s+(.*)$", line)
        if match and match.group(3).strip() == HOOK:
            return int(match.group(2))
    raise SystemExit(f"{HOOK} was not imported at start-up: is the package installed in {sys.executable}?")


def wall_ms() -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    hook = [hook_import_us() / 1000 for _ in range(args.runs)]
    wall = [wall_ms() for _ in range(args.runs)]
    print(f"python: {sys.executable} ({sys.version.split()[0]}), runs: {args.runs}")
    print("| measure | median | max | target |")
    print("|---|---|---|---|")
    print(
        f"| hook import (cumulative, -X importtime) | {statistics.median(hook):.2f} ms | {max(hook):.2f} ms | <= 10 ms |"
    )
    print(f"| whole `python -c pass` (context) | {statistics.median(wall):.1f} ms | {max(wall):.1f} ms | - |")
    if statistics.median(hook) > 10:
        raise SystemExit("startup target missed")


if __name__ == "__main__":
    main()
