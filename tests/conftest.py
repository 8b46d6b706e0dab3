"""Shared fixtures: every test runs against the *installed* package in the project environment."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]

# One intra-op thread per process: `make test` runs one xdist worker per core, and the tensors here
# are tiny, so a second torch thread only waits for a core the other worker holds (measured on 2
# cores, both busy: test_learning's 120-step training + learning check took 82 s of CPU with torch's
# default of two threads, 15 s with one, same figures). Set before torch starts its thread pool;
# every host run and worker the tests start inherits it. An OMP_NUM_THREADS of the caller wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_sessionstart(session: pytest.Session) -> None:
    import torch

    import simpletuner_longcat_video

    # In case a plugin imported torch before this file set OMP_NUM_THREADS.
    if os.environ["OMP_NUM_THREADS"].isdigit():
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    if "site-packages" not in simpletuner_longcat_video.__file__:
        raise pytest.UsageError(
            f"tests must run against the installed package, not {simpletuner_longcat_video.__file__}; "
            "run them with `make test` (it installs the checkout first)"
        )


# Modules with several real host runs, costliest first (serial wall time on 2 cores, 2026-12-01).
# `make test` hands whole files to its workers in collection order; starting with these keeps a
# 5-minute module from being the last one a worker picks up.
COSTLIEST_FIRST = (
    "test_distributed.py",
    "test_faults.py",
    "test_host_cli.py",
    "test_i2v_training.py",
    "test_bad_inputs.py",
    "test_learning.py",
    "test_webui.py",
    "test_quickstart.py",
    "test_user_data.py",
    "test_export_lora.py",
    "test_context_parallel.py",
    "test_kernels_block_sparse.py",
    "test_memory_options.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: index for index, name in enumerate(COSTLIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order


def load_demo():
    """``examples/demo.py`` as a module: the tests drive the real host the way the demo does."""
    spec = importlib.util.spec_from_file_location("longcat_demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def host_environ(**extra: str) -> dict[str, str]:
    """The environment a user's shell would have: the project env first on PATH, no hub."""
    env = dict(os.environ)
    env["PATH"] = f"{ENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        WANDB_MODE="offline",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def run_python(code: str, *, timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter of the project environment (a new process, as users get)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=host_environ(**env),
        # Not the repo root, so the checkout's tests/ or examples/ never shadow a name the code
        # imports (running from the root is tested on its own: tests/test_layout.py).
        cwd=tempfile.gettempdir(),
    )


@pytest.fixture
def python_subprocess():
    return run_python


@pytest.fixture(scope="session", autouse=True)
def tiny_checkpoints_built_once(tmp_path_factory: pytest.TempPathFactory):
    """``testing.tiny.build_tiny_checkpoint`` builds each (seed, sizes) once per test process and copies it after.

    Every host-run test starts from ``examples/demo.py``'s ``prepare``, which builds the tiny
    checkpoint: a few seconds of CPU each time for the same bytes (the build is seeded). A copy
    takes milliseconds, and each test still gets a folder of its own to break.
    """
    from simpletuner_longcat_video.testing import tiny

    build = tiny.build_tiny_checkpoint
    built: dict[tuple, Path] = {}

    def build_or_copy(root: str | Path, *, seed: int = 0, sizes: tiny.TinySizes | None = None) -> Path:
        sizes = sizes or tiny.TinySizes()
        if (seed, sizes) not in built:
            built[seed, sizes] = build(
                tmp_path_factory.mktemp("tiny-checkpoint-built") / "ckpt", seed=seed, sizes=sizes
            )
        shutil.copytree(built[seed, sizes], root, dirs_exist_ok=True)
        return Path(root)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny, "build_tiny_checkpoint", build_or_copy)
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LongCat-Video checkpoint in the official folder layout (built once per session)."""
    from simpletuner_longcat_video.testing.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-longcat") / "LongCat-Video-tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint: Path):
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    return load_pipeline(str(tiny_checkpoint))
