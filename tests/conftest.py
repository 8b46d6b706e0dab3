"""Shared fixtures: every test runs against the *installed* package in the project environment."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ENV_BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session: pytest.Session) -> None:
    import simpletuner_longcat_video

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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny LongCat-Video checkpoint in the official folder layout (built once per session)."""
    from simpletuner_longcat_video.testing.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-longcat") / "LongCat-Video-tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint: Path):
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    return load_pipeline(str(tiny_checkpoint))
