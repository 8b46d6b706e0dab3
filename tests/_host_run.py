"""Running the real `simpletuner train` on the tiny checkpoint and dataset of `examples/demo.py`."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from conftest import load_demo

demo = load_demo()
RECORDER = Path(__file__).resolve().parent / "fault_injection"


def recorded_run(workdir: Path) -> tuple[int, str, dict]:
    """``simpletuner train`` in a prepared ``workdir``, recorded into ``workdir/record`` (fault_injection/sitecustomize.py).

    Returns the exit code, the log and ``demo.summarise``'s summary of what the run wrote.
    """
    record = workdir / "record"
    record.mkdir()
    command, env = demo.host_command(workdir)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(RECORDER), os.environ.get("PYTHONPATH")])),
        LONGCAT_RECORD_DIR=str(record),
    )
    with (workdir / "train.log").open("w") as log:
        code = subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    log = (workdir / "train.log").read_text(errors="replace")
    return code, log, demo.summarise(workdir, log)


def run_host(workdir: Path, mutate: Callable[[Path], None] | None = None) -> tuple[int, str]:
    """Prepare the demo under ``workdir``, let ``mutate`` break it, run the host; (exit code, log)."""
    demo.prepare(workdir)
    if mutate is not None:
        mutate(workdir)
    code = demo.train(workdir, workdir / "train.log")
    # The host colours its log; the messages are compared as plain text.
    return code, re.sub(r"\x1b\[[0-9;]*m", "", (workdir / "train.log").read_text(errors="replace"))


def edit_json(path: Path, edit: Callable[[object], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def assert_nothing_trained(workdir: Path, code: int, log: str) -> None:
    """The run stopped with an error before the first optimiser step and wrote no weights."""
    assert code != 0, log[-3000:]
    assert "step_loss" not in log
    assert demo.summarise(workdir, log)["losses"] == []
    output = workdir / "output"
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    assert not list(output.glob("checkpoint-*"))


def pipeline_calls(workdir: Path) -> list[dict]:
    calls = sorted((workdir / "record").glob("pipeline_call_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    return [torch.load(path, weights_only=False) for path in calls]


def cached_latent(folder: Path, name: str) -> torch.Tensor:
    """The host's VAE cache entry for the file ``name`` (any suffix) of the dataset cached in ``folder``."""
    raw = (folder / f"{hashlib.sha256(name.encode()).hexdigest()}.pt").read_bytes()
    with contextlib.suppress(OSError):
        raw = gzip.decompress(raw)
    return torch.load(io.BytesIO(raw), map_location="cpu")
