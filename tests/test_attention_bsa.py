"""The real block-sparse backend inside a real DiT forward: a kernel failure must not kill training."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from test_transformer import i2v_timesteps, inputs, run, tiny_model

from simpletuner_longcat_video.core import attention, attention_bsa


@pytest.fixture
def block_sparse_forced_available():
    # On a CPU machine the backend reports itself unavailable; pretend Triton compiled so the
    # launch itself is what fails, as it would on a GPU whose driver rejects the kernel.
    attention.load_entry_point_backends()
    attention.register_backend(dataclasses.replace(attention_bsa.BACKEND, is_available=lambda: True))
    attention.reset_backend_state()
    yield
    # Put the entry point's backend back: entry points load once per process, so loading them again
    # would leave block_sparse unregistered for the modules that run after this one.
    attention.register_backend(attention_bsa.BACKEND)
    attention.reset_backend_state()


def test_entry_point_backend_is_the_adapter():
    attention.load_entry_point_backends()
    assert "block_sparse" in attention.registered_backends()
    ok, reason = attention_bsa.is_available()
    assert ok is torch.cuda.is_available() and reason


def test_kernel_launch_failure_falls_back_to_sdpa_with_identical_output(
    block_sparse_forced_available, monkeypatch, caplog
):
    launches = []

    def failing_kernel(*args, **kwargs):
        launches.append(1)
        raise RuntimeError("triton: PTX JIT compilation failed")

    monkeypatch.setattr(attention_bsa, "block_sparse_attention", failing_kernel)
    model = tiny_model()
    x, t, y, mask = inputs(frames=3)
    t = i2v_timesteps(t, frames=3)
    model.set_attention_options(backend="sdpa")
    expected = run(model, x, t, y, mask, ncl=1)
    model.set_attention_options(backend="block_sparse", sparsity=0.0)
    with caplog.at_level(logging.INFO, logger="simpletuner_longcat_video.core.attention"):
        first = run(model, x, t, y, mask, ncl=1)
        second = run(model, x, t, y, mask, ncl=1)
    assert launches == [1]  # retired after the first failure, never relaunched
    assert torch.equal(first, expected) and torch.equal(second, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "PTX JIT compilation failed" in warnings[0]
    assert "block_sparse" in attention.failed_backends()
