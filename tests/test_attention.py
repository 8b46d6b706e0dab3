"""The attention seam: I2V split, backend registry, entry points, fallback and cross-attention masks."""

from __future__ import annotations

import logging

import pytest
import torch

from simpletuner_longcat_video.core import attention
from simpletuner_longcat_video.core.attention import (
    AttentionContext,
    AttentionOptions,
    Backend,
    BackendDeclined,
    dispatch_attention,
    dispatch_cross_attention,
    register_backend,
)

LOGGER = "simpletuner_longcat_video.core.attention"


@pytest.fixture(autouse=True)
def isolated_registry(monkeypatch):
    """Each test sees the built-ins plus whatever it registers, and no real entry points."""
    monkeypatch.setattr(
        attention, "_REGISTRY", {k: v for k, v in attention._REGISTRY.items() if k in ("sdpa", "xformers")}
    )
    monkeypatch.setattr(attention, "_FAILED", {})
    monkeypatch.setattr(attention, "_LOGGED", set())
    monkeypatch.setattr(attention, "_entry_points_loaded", True)
    yield


def qkv(batch=2, heads=3, seq=24, dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq, dim, generator=gen, dtype=dtype) for _ in range(3))


def reference(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """Masked softmax attention in float64; ``allowed`` is [Sq, Sk] or [B, 1, Sq, Sk]."""
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def i2v_mask(seq: int, n_cond: int) -> torch.Tensor:
    allowed = torch.ones(seq, seq, dtype=torch.bool)
    allowed[:n_cond, n_cond:] = False  # condition queries never see noisy keys
    return allowed


# -- self-attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_cond", [0, 8, 16])
def test_sdpa_matches_float64_reference_with_explicit_i2v_mask(n_cond):
    q, k, v = qkv()
    ctx = AttentionContext(grid=(3, 2, 4), num_cond_tokens=n_cond, options=AttentionOptions(backend="sdpa"))
    out = dispatch_attention(q, k, v, ctx)
    expected = reference(q, k, v, i2v_mask(24, n_cond))
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_backends_see_the_i2v_halves_with_their_grids():
    calls = []

    def spy(q, k, v, *, q_grid, kv_grid, options):
        calls.append((q.shape[2], k.shape[2], q_grid, kv_grid, options.sparsity))
        return attention.sdpa_backend(q, k, v, q_grid=q_grid, kv_grid=kv_grid, options=options)

    register_backend(Backend("spy", spy))
    q, k, v = qkv()
    opts = AttentionOptions(backend="spy", sparsity=0.5)
    dispatch_attention(q, k, v, AttentionContext(grid=(3, 2, 4), num_cond_tokens=8, options=opts))
    assert calls == [(8, 8, (1, 2, 4), (1, 2, 4), 0.5), (16, 24, (2, 2, 4), (3, 2, 4), 0.5)]


def test_grid_and_condition_size_are_checked():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="token grid"):
        dispatch_attention(q, k, v, AttentionContext(grid=(2, 2, 4)))
    with pytest.raises(ValueError, match="whole frames"):
        dispatch_attention(q, k, v, AttentionContext(grid=(3, 2, 4), num_cond_tokens=5))


def test_options_are_validated_by_the_backend_that_reads_them():
    from simpletuner_longcat_video.core import attention_bsa

    assert AttentionOptions(chunk=[4, 4, 8]).chunk == (4, 4, 8)
    assert attention.check_options(AttentionOptions(sparsity=1.5)).sparsity == 1.5  # no backend reads it
    register_backend(attention_bsa.BACKEND)
    with pytest.raises(ValueError, match="sparsity"):
        attention.check_options(AttentionOptions(sparsity=1.5))
    with pytest.raises(ValueError, match="chunk"):
        attention.check_options(AttentionOptions(chunk=(4, 4)))
    with pytest.raises(ValueError, match="power of two"):
        attention.check_options(AttentionOptions(chunk=(3, 3, 3)))
    attention.check_options(AttentionOptions())  # upstream's defaults pass


# -- registry, selection, fallback -------------------------------------------------------------


def test_raising_backend_falls_back_to_sdpa_and_logs_once(caplog):
    calls = []

    def broken(q, k, v, **kwargs):
        calls.append(1)
        raise RuntimeError("triton launch failed")

    register_backend(Backend("broken", broken))
    q, k, v = qkv()
    ctx = AttentionContext(grid=(3, 2, 4), num_cond_tokens=8, options=AttentionOptions(backend="broken"))
    expected = dispatch_attention(
        q, k, v, AttentionContext(grid=(3, 2, 4), num_cond_tokens=8, options=AttentionOptions("sdpa"))
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = dispatch_attention(q, k, v, ctx)
        second = dispatch_attention(q, k, v, ctx)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    warnings = [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
    assert (
        len(warnings) == 1
        and "broken" in warnings[0].getMessage()
        and "triton launch failed" in warnings[0].getMessage()
    )
    assert calls == [1]  # retired after the first failure: not retried for the second half or call
    assert "broken" in attention.failed_backends()


def test_out_of_memory_is_not_swallowed():
    def oom(q, k, v, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    register_backend(Backend("oom", oom))
    q, k, v = qkv()
    with pytest.raises(torch.OutOfMemoryError):
        dispatch_attention(q, k, v, AttentionContext(grid=(3, 2, 4), options=AttentionOptions(backend="oom")))
    assert "oom" not in attention.failed_backends()


def test_declining_backend_serves_other_calls(caplog):
    def picky(q, k, v, *, q_grid, kv_grid, options):
        if q_grid[0] < 2:
            raise BackendDeclined("needs at least 2 frames")
        return 2 * attention.sdpa_backend(q, k, v, q_grid=q_grid, kv_grid=kv_grid, options=options)

    register_backend(Backend("picky", picky))
    q, k, v = qkv()
    ctx = AttentionContext(grid=(3, 2, 4), num_cond_tokens=8, options=AttentionOptions(backend="picky"))
    dense = dispatch_attention(
        q, k, v, AttentionContext(grid=(3, 2, 4), num_cond_tokens=8, options=AttentionOptions("sdpa"))
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = dispatch_attention(q, k, v, ctx)
        dispatch_attention(q, k, v, ctx)
    torch.testing.assert_close(out[:, :, :8], dense[:, :, :8])  # declined half -> sdpa
    torch.testing.assert_close(out[:, :, 8:], 2 * dense[:, :, 8:])  # served half -> picky
    assert attention.failed_backends() == {}
    assert sum("declined" in r.getMessage() for r in caplog.records) == 1


def _candidate(name: str, attend=attention.sdpa_backend, is_available=lambda: True) -> Backend:
    # A backend that asks to be chosen by "auto" on CUDA for multi-frame grids, as the block-sparse
    # one does; any name works, the seam knows none.
    return Backend(name, attend, is_available, auto=True, device_types=("cuda",), min_frames=2)


def test_auto_picks_sdpa_on_cpu_and_logs_each_reason_once(caplog):
    q, k, v = qkv()
    ctx = AttentionContext(grid=(3, 2, 4), options=AttentionOptions(backend="auto"))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        dispatch_attention(q, k, v, ctx)
        dispatch_attention(q, k, v, ctx)
        register_backend(_candidate("tiled", lambda q, k, v, **kw: pytest.fail("must not run on CPU")))
        dispatch_attention(q, k, v, ctx)
        dispatch_attention(q, k, v, ctx)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert messages == [
        "attention backend 'auto' -> 'sdpa': no backend is a candidate for auto",
        "attention backend 'auto' -> 'sdpa': tiled needs cuda tensors, these are on cpu",
    ]


def test_auto_rule_prefers_a_candidate_on_cuda_for_multi_frame_grids():
    register_backend(_candidate("tiled"))
    register_backend(Backend("plain", attention.sdpa_backend))  # not a candidate: never picked by auto
    cuda_like = torch.empty(0, device="meta")  # device type is all the rule reads
    opts = AttentionOptions(backend="auto")
    assert attention.select_backend(opts, cuda_like, (2, 4, 4), (3, 4, 4)) == "sdpa"  # not CUDA
    fake = type("FakeCuda", (), {"device": torch.device("cuda", 0)})()
    assert attention.select_backend(opts, fake, (2, 4, 4), (3, 4, 4)) == "tiled"
    assert attention.select_backend(opts, fake, (1, 4, 4), (1, 4, 4)) == "sdpa"  # single frame
    # Asked by name, a single-frame call still goes to SDPA (min_frames), a multi-frame one does not.
    named = AttentionOptions(backend="tiled")
    assert attention.select_backend(named, fake, (1, 4, 4), (1, 4, 4)) == "sdpa"
    assert attention.select_backend(named, fake, (2, 4, 4), (2, 4, 4)) == "tiled"
    register_backend(_candidate("tiled", is_available=lambda: False))
    assert attention.select_backend(opts, fake, (2, 4, 4), (3, 4, 4)) == "sdpa"  # unavailable


def test_backends_check_the_options_they_read():
    def refuse_odd_chunks(options: AttentionOptions) -> None:
        if any(c % 2 for c in options.chunk):
            raise ValueError("chunk entries must be even")

    register_backend(Backend("even", attention.sdpa_backend, check_options=refuse_odd_chunks))
    assert attention.check_options(AttentionOptions(chunk=(2, 4, 8))).chunk == (2, 4, 8)
    with pytest.raises(ValueError, match="must be even"):
        attention.check_options(AttentionOptions(chunk=(3, 4, 8)))
    with pytest.raises(TypeError, match="pass an attention.Backend"):
        register_backend(attention.sdpa_backend)


def test_unknown_and_unavailable_backends_are_clear_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="no such backend.*known"):
        dispatch_attention(q, k, v, AttentionContext(grid=(3, 2, 4), options=AttentionOptions(backend="nope")))
    register_backend(Backend("absent", attention.sdpa_backend, lambda: False))
    with pytest.raises(RuntimeError, match="not available"):
        dispatch_attention(q, k, v, AttentionContext(grid=(3, 2, 4), options=AttentionOptions(backend="absent")))
    with pytest.raises(ValueError, match="cannot be replaced"):
        register_backend(Backend("sdpa", attention.sdpa_backend))


@pytest.mark.skipif(attention.xformers_available(), reason="xformers is installed")
def test_xformers_without_the_package_says_how_to_fix():
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="pip install xformers"):
        dispatch_attention(q, k, v, AttentionContext(grid=(3, 2, 4), options=AttentionOptions(backend="xformers")))


class _FakeEntryPoint:
    def __init__(self, name, target=None, error=None):
        self.name, self.value, self._target, self._error = name, f"fake.module:{name}", target, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._target


def test_entry_point_backends_are_discovered_lazily_and_bad_ones_skipped(monkeypatch, caplog):
    def negated(q, k, v, *, q_grid, kv_grid, options):
        return -attention.sdpa_backend(q, k, v, q_grid=q_grid, kv_grid=kv_grid, options=options)

    fake_eps = [
        _FakeEntryPoint("negated", Backend("negated", negated)),
        # An entry point names a Backend: a bare function, a wrong name or a failing import is skipped.
        _FakeEntryPoint("bare_function", negated),
        _FakeEntryPoint("misnamed", Backend("other_name", negated)),
        _FakeEntryPoint("broken_import", error=ImportError("no module named fake")),
    ]
    seen_groups = []

    def fake_entry_points(*, group):
        seen_groups.append(group)
        return fake_eps

    monkeypatch.setattr(attention.importlib.metadata, "entry_points", fake_entry_points)
    monkeypatch.setattr(attention, "_entry_points_loaded", False)
    q, k, v = qkv()
    dense = attention.sdpa_backend(q, k, v, q_grid=(3, 2, 4), kv_grid=(3, 2, 4), options=AttentionOptions())
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = dispatch_attention(q, k, v, AttentionContext(grid=(3, 2, 4), options=AttentionOptions("negated")))
        names = attention.registered_backends()
    assert seen_groups == ["simpletuner.attention_backends"]  # scanned once
    torch.testing.assert_close(out, -dense)
    assert names["negated"] and not {"bare_function", "misnamed", "other_name", "broken_import"} & set(names)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 3


# -- cross-attention ---------------------------------------------------------------------------


def test_cross_attention_mask_matches_reference_and_empty_rows_are_zero():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 2, 10, 8, generator=gen)
    k = torch.randn(3, 2, 5, 8, generator=gen)
    v = torch.randn(3, 2, 5, 8, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = dispatch_cross_attention(q, k, v, mask)
    allowed = mask.bool()[:, None, None, :].expand(3, 1, 10, 5)
    expected = reference(q[:2], k[:2], v[:2], allowed[:2])
    torch.testing.assert_close(out[:2].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    unmasked = dispatch_cross_attention(q, k, v, None).double()
    torch.testing.assert_close(unmasked, reference(q, k, v, torch.ones(10, 5, dtype=torch.bool)), atol=1e-5, rtol=1e-5)


def test_cross_attention_fully_masked_row_has_finite_gradients():
    q, k, v = (t.requires_grad_() for t in qkv(batch=2, seq=6))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    dispatch_cross_attention(q, k, v, mask).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    with pytest.raises(ValueError, match="does not match keys"):
        dispatch_cross_attention(q, k, v, mask[:, :4])


def test_dense_attention_asks_for_cudnn_first_and_compiles_in_one_graph(monkeypatch):
    """Every dense call of the seam (self- and cross-attention) runs under cuDNN-first priority;
    PyTorch's own order (flash first, cuDNN last) is back after the call; a compiled call is one graph."""
    cudnn = int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    default_order = torch._C._get_sdp_priority_order()
    assert default_order[0] != cudnn  # the premise: PyTorch alone would not try cuDNN first
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch._C._get_sdp_priority_order()[0])
        return sdpa(*args, **kwargs)

    q, k, v = qkv(seq=12)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    grid = (3, 2, 2)
    attention.sdpa_backend(q, k, v, q_grid=grid, kv_grid=grid, options=AttentionOptions())
    dispatch_cross_attention(q, k[:, :, :5], v[:, :, :5], torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]))
    dispatch_cross_attention(q, k, v)
    assert seen == [cudnn] * 3
    assert torch._C._get_sdp_priority_order() == default_order
    monkeypatch.undo()

    torch._dynamo.reset()
    compiled = torch.compile(attention.dense_attention, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), sdpa(q, k, v))
