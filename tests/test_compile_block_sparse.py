"""torch.compile and the block-sparse kernels compose: compiled blocks call the kernels as opaque ops.

The real Triton kernels run under TRITON_INTERPRET=1 on CPU at tiny sizes, in one fresh interpreter
started with the variable set (this file, run as a script; see test_kernels_block_sparse.py for why),
which reports what it measured; the tests assert on the report. What is checked:

* a tiny DiT with LoRA, every block compiled (``compile_blocks``, backend aot_eager), gives the eager
  outputs and gradients; the kernels really ran (their launches are counted: one forward and one
  backward per block), no backend was retired, and the output is not SDPA's (sparsity is in force);
* Dynamo made one graph per block, with no graph break, and the forward op is in every graph;
* attention alone (the seam, the I2V split, projections) compiled by Inductor matches eager;
* the condition KV cache of sampling with block-sparse attention in compiled blocks: the cached step
  gives the uncached one's output, the kernels are in every graph and nothing fell back;
* ``torch.library.opcheck``: the ops' schemas, autograd registration and fake (shape function)
  outputs agree with the real ones, for top-k, CDF and half-tile (partial grid) selections.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

import pytest
import torch
from _tiny_dit import TINY, i2v_batch, i2v_loss, lora_dit, take_lora_grads
from test_kernels_block_sparse import kernel_worker_report

# Float32 throughout. aot_eager runs the eager kernels op by op, so only the order of LoRA sums may
# differ; Inductor fuses float32 element-wise chains (the rounding of test_memory_options' compile test).
AOT_EAGER_RTOL = 1e-5
INDUCTOR_RTOL = 1e-4

# Latent grid 3x8x8 -> tokens 3x4x4; one condition frame, so the noisy queries (2 frames) run block-sparse
# over 3 key blocks of (1, 4, 4), keeping 1 (the condition frame's single-frame call goes to SDPA).
OPTIONS = dict(backend="block_sparse", sparsity=0.5, chunk=(1, 4, 4))


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# Worker side: runs in the fresh interpreter with TRITON_INTERPRET=1.


class _Launches:
    """Counts the Triton forward and backward launches (the real kernels, not their tracing)."""

    def __init__(self) -> None:
        from simpletuner_longcat_video.kernels import triton_bsa

        self.counts = {"forward": 0, "backward": 0}
        forward, backward = triton_bsa.bsa_forward, triton_bsa.bsa_backward

        def counted_forward(*args, **kwargs):
            self.counts["forward"] += 1
            return forward(*args, **kwargs)

        def counted_backward(*args, **kwargs):
            self.counts["backward"] += 1
            return backward(*args, **kwargs)

        triton_bsa.bsa_forward, triton_bsa.bsa_backward = counted_forward, counted_backward

    def take(self) -> dict[str, int]:
        counts = dict(self.counts)
        self.counts.update(forward=0, backward=0)
        return counts


def _recording(backend: str, graphs: list) -> object:
    def compile_graph(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    return compile_graph


def _ops_in(graph) -> list[str]:
    return [str(node.target) for node in graph.graph.nodes if str(node.target).startswith("longcat_bsa.")]


def _dit(backend: str = "block_sparse"):
    model = lora_dit()
    model.set_attention_options(**{**OPTIONS, "backend": backend})
    return model


def _dit_step(model) -> dict[str, torch.Tensor]:
    latents, *rest = i2v_batch()
    latents.requires_grad_()
    out, loss = i2v_loss(model, (latents, *rest))
    loss.backward()
    return {"out": out.detach(), "latents.grad": latents.grad, **take_lora_grads(model)}


@torch.no_grad()
def _dit_sample(model) -> torch.Tensor:
    # What validation does after training steps: no grad, both CFG branches in one batch of 2.
    gen = torch.Generator().manual_seed(4)
    latents = torch.randn(2, 16, 3, 8, 8, generator=gen)
    timesteps = torch.tensor([[0.0, 400.0, 400.0]] * 2)
    text = torch.randn(2, 1, 6, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    return model(latents, timesteps, text, mask, num_cond_latents=1, return_dict=False)[0]


def _compare(got: dict, ref: dict) -> dict[str, float]:
    return {name: _rel(got[name], ref[name]) for name in ref}


def _check_dit(launches: _Launches) -> dict[str, object]:
    from torch._dynamo.utils import counters

    from simpletuner_longcat_video.core import attention

    eager_model = _dit()
    eager = _dit_step(eager_model)
    eager_launches = launches.take()
    eager_sample = _dit_sample(eager_model)
    launches.take()
    sdpa = _dit_step(_dit("sdpa"))
    launches.take()

    model = _dit()
    graphs: list = []
    counters.clear()
    model.compile_blocks(backend=_recording("aot_eager", graphs))
    started = time.perf_counter()
    compiled = _dit_step(model)
    first_step_s = time.perf_counter() - started
    compiled_launches = launches.take()
    graphs_first_step = len(graphs)
    again = _dit_step(model)  # the compiled graphs again, no new compile
    second_step_launches = launches.take()
    graphs_after_second_step = len(graphs)
    sample = _dit_sample(model)  # a new grad mode and batch: compiles again, must still run the kernels
    return {
        "sampling_launches": launches.take(),
        "rel_sampling_vs_eager": _rel(sample, eager_sample),
        "eager_launches": eager_launches,
        "compiled_launches": compiled_launches,
        "second_step_launches": second_step_launches,
        "graphs": graphs_first_step,
        "graphs_after_second_step": graphs_after_second_step,
        "ops_per_graph": [_ops_in(g) for g in graphs[:graphs_after_second_step]],
        "graph_breaks": sum(counters["graph_break"].values()),
        "failed_backends": attention.failed_backends(),
        "rel_compiled_vs_eager": _compare(compiled, eager),
        "rel_second_vs_eager": _compare(again, eager),
        "rel_eager_vs_sdpa_out": _rel(eager["out"], sdpa["out"]),
        "first_compiled_step_s": round(first_step_s, 2),
        "depth": TINY["depth"],
    }


def _cache_step(model, cached: bool) -> torch.Tensor:
    """A no-grad sampling step of continuation: 4 latent frames, the first 2 the condition (5 pixel
    frames), so both the condition call and the noisy call run the kernels. Batch 1 keeps the
    interpreter quick; the CFG batch's use of the cache is checked with SDPA (test_condition_cache.py)."""
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 16, 4, 8, 8, generator=gen)
    timesteps = torch.tensor([[0.0, 0.0, 700.0, 700.0]])
    text = torch.randn(1, 1, 6, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        cache = model.condition_cache(latents[:, :, :2], total_frames=4) if cached else None
        return model(latents, timesteps, text, mask, 2, return_dict=False, condition_cache=cache)[0]


def _check_cache(launches: _Launches) -> dict[str, object]:
    """The condition KV cache with block-sparse attention, eager and in compiled blocks."""
    from torch._dynamo.utils import counters

    from simpletuner_longcat_video.core import attention

    # One model for every row (building one with LoRA costs more than a step here), and no eager
    # cached step: aot_eager runs the eager ops, so the compiled cached step stands for both.
    model = _dit()
    uncached = _cache_step(model, cached=False)
    uncached_launches = launches.take()
    model.set_attention_options(backend="sdpa")
    dense = _cache_step(model, cached=True)
    model.set_attention_options(**OPTIONS)
    launches.take()
    graphs: list = []
    counters.clear()
    # Dynamo's caches still hold the training graphs of _check_dit's models (the same block code);
    # guarding against them made this compile take minutes instead of seconds.
    torch._dynamo.reset()
    model.compile_blocks(backend=_recording("aot_eager", graphs))
    compiled = _cache_step(model, cached=True)
    return {
        "launches": {"uncached": uncached_launches, "compiled_cached": launches.take()},
        "graphs": len(graphs),
        "ops_per_graph": [_ops_in(g) for g in graphs],
        "graph_breaks": sum(counters["graph_break"].values()),
        "failed_backends": attention.failed_backends(),
        "rel_compiled_cached_vs_uncached": _rel(compiled, uncached),
        "rel_compiled_cached_vs_sdpa": _rel(compiled, dense),
        "depth": TINY["depth"],
    }


class _Attention(torch.nn.Module):
    """Projections around the seam, as a DiT block's self-attention uses it (I2V split included)."""

    def __init__(self) -> None:
        from simpletuner_longcat_video.core.attention import AttentionContext, AttentionOptions

        super().__init__()
        self.qkv = torch.nn.Linear(64, 3 * 64)
        self.proj = torch.nn.Linear(64, 64)
        self.context = AttentionContext(grid=(3, 4, 4), num_cond_tokens=16, options=AttentionOptions(**OPTIONS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from simpletuner_longcat_video.core.attention import dispatch_attention

        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)
        out = dispatch_attention(q, k, v, self.context)
        return self.proj(out.transpose(1, 2).reshape(b, s, 64))


def _attention_step(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    x = torch.randn(2, 48, 64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = module(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {name: p.grad for name, p in module.named_parameters()}
    return {"out": out.detach(), "x.grad": x.grad, **grads}


def _check_inductor(launches: _Launches) -> dict[str, object]:
    from torch._dynamo.utils import counters

    from simpletuner_longcat_video.core import attention

    torch.manual_seed(2)
    eager_module = _Attention()
    compiled_module = _Attention()
    compiled_module.load_state_dict(eager_module.state_dict())
    eager = _attention_step(eager_module)
    launches.take()
    graphs: list = []
    counters.clear()
    compiled_module.compile(backend=_recording("inductor", graphs))
    started = time.perf_counter()
    compiled = _attention_step(compiled_module)
    return {
        "compiled_launches": launches.take(),
        "graphs": len(graphs),
        "ops_per_graph": [_ops_in(g) for g in graphs],
        "graph_breaks": sum(counters["graph_break"].values()),
        "failed_backends": attention.failed_backends(),
        "rel_compiled_vs_eager": _compare(compiled, eager),
        "compile_and_step_s": round(time.perf_counter() - started, 2),
    }


OPCHECK_CASES = {
    # name: (q_grid, kv_grid, chunk, sparsity, cdf_threshold)
    "topk-i2v": ((2, 4, 4), (3, 4, 4), (1, 4, 4), 0.5, None),
    "cdf-partial": ((2, 3, 6), (2, 3, 6), (1, 2, 8), 0.6, 0.5),
}


def _check_opcheck() -> dict[str, str]:
    from simpletuner_longcat_video.kernels import block_sparse

    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    # The backward op has no autograd of its own (no double backward): schema and fake only.
    backward_tests = ("test_schema", "test_faketensor")
    results = {}
    for name, (q_grid, kv_grid, chunk, sparsity, cdf) in OPCHECK_CASES.items():
        gen = torch.Generator().manual_seed(4)
        # Strided q, k, v, as the DiT hands them over (views of one packed projection).
        qkv = torch.randn(1, math.prod(kv_grid), 3, 2, 16, generator=gen).permute(2, 0, 3, 1, 4)
        q = qkv[0, :, :, : math.prod(q_grid)].requires_grad_()
        k, v = (t.requires_grad_() for t in (qkv[1], qkv[2]))
        grids = ([*q_grid], [*kv_grid], [*chunk])
        args = (q, k, v, *grids, sparsity, cdf, 0.25)
        try:
            torch.library.opcheck(block_sparse._forward_op, args, test_utils=tests)
            o, lse, kv_list, kv_count = block_sparse._forward_op(*(t.detach() for t in (q, k, v)), *args[3:])
            do = torch.randn(o.shape, generator=gen)
            backward_args = (do, q.detach(), k.detach(), v.detach(), o, lse, kv_list, kv_count, *grids, 0.25)
            torch.library.opcheck(block_sparse._backward_op, backward_args, test_utils=backward_tests)
            results[name] = "ok"
        except Exception as exc:  # the test side shows what failed
            results[name] = f"{type(exc).__name__}: {str(exc)[:600]}"
    return results


def _worker_main() -> None:
    from simpletuner_longcat_video.core import attention, attention_bsa

    assert os.environ.get("TRITON_INTERPRET") == "1", "worker started without TRITON_INTERPRET=1"
    # No CUDA here: the probe says unavailable; the interpreter runs the same kernels.
    attention.load_entry_point_backends()
    attention.register_backend(dataclasses.replace(attention_bsa.BACKEND, is_available=lambda: True))
    launches = _Launches()
    wall = {}
    results = {}
    for name, check in (("dit", _check_dit), ("inductor", _check_inductor), ("cache", _check_cache)):
        started = time.perf_counter()
        results[name] = check(launches)
        wall[name] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    results["opcheck"] = _check_opcheck()
    wall["opcheck"] = round(time.perf_counter() - started, 2)
    results["wall_s"] = wall
    print("COMPILE-BSA-RESULTS " + json.dumps(results))


# ---------------------------------------------------------------------------------------------
# Test side.


@pytest.fixture(scope="module")
def report() -> dict[str, dict]:
    result = kernel_worker_report(__file__, "COMPILE-BSA-RESULTS ")
    print("worker report:", json.dumps(result, indent=1))
    return result


def test_compiled_dit_runs_the_block_sparse_kernels_with_eager_results(report):
    dit = report["dit"]
    depth = dit["depth"]
    per_step = {"forward": depth, "backward": depth}
    # The eager step launches one forward and one backward per block (the noisy half of each I2V
    # call); the compiled step launches the same kernels, no more and no fewer: nothing fell back.
    assert dit["eager_launches"] == per_step
    assert dit["compiled_launches"] == per_step and dit["second_step_launches"] == per_step
    assert dit["failed_backends"] == {}
    for name, rel in {**dit["rel_compiled_vs_eager"], **dit["rel_second_vs_eager"]}.items():
        assert rel <= AOT_EAGER_RTOL, f"{name}: relative difference {rel:.2e}"
    # Sparsity is in force: the same model under SDPA gives another output.
    assert dit["rel_eager_vs_sdpa_out"] > 1e-2
    # Validation after training (no grad, CFG batch of 2) recompiles and still runs the kernels.
    assert dit["sampling_launches"] == {"forward": depth, "backward": 0}
    assert dit["rel_sampling_vs_eager"] <= AOT_EAGER_RTOL


def test_compiled_dit_has_one_graph_per_block_with_the_op_in_it(report):
    dit = report["dit"]
    assert dit["graph_breaks"] == 0
    assert dit["graphs"] == dit["depth"] == dit["graphs_after_second_step"]
    # The backward op is called by the forward op's autograd formula, so the forward graph holds
    # the forward op only; the kernels it launches are counted above.
    assert dit["ops_per_graph"] == [["longcat_bsa.forward.default"]] * dit["depth"]


def test_inductor_compiled_attention_matches_eager(report):
    result = report["inductor"]
    assert result["compiled_launches"] == {"forward": 1, "backward": 1}
    assert result["failed_backends"] == {}
    assert result["graph_breaks"] == 0 and result["graphs"] == 1
    assert result["ops_per_graph"] == [["longcat_bsa.forward.default"]]
    for name, rel in result["rel_compiled_vs_eager"].items():
        assert rel <= INDUCTOR_RTOL, f"{name}: relative difference {rel:.2e}"


def test_condition_cache_keeps_block_sparse_attention_in_compiled_blocks(report):
    result = report["cache"]
    depth = result["depth"]
    # Uncached, each block runs the condition call (2 frames) and the noisy call (2 frames against 4);
    # with the cache the (eager) cache pass makes the condition calls and the compiled step the noisy
    # ones: the same kernel launches, none fell back to SDPA, one graph per block with the op in it.
    per_step = {"forward": 2 * depth, "backward": 0}
    assert result["launches"] == {"uncached": per_step, "compiled_cached": per_step}
    assert result["failed_backends"] == {} and result["graph_breaks"] == 0
    assert result["graphs"] == depth and result["ops_per_graph"] == [["longcat_bsa.forward.default"]] * depth
    assert result["rel_compiled_cached_vs_uncached"] <= AOT_EAGER_RTOL
    assert result["rel_compiled_cached_vs_sdpa"] > 1e-2  # sparsity was in force


@pytest.mark.parametrize("case", list(OPCHECK_CASES), ids=list(OPCHECK_CASES))
def test_ops_pass_opcheck(report, case):
    assert report["opcheck"][case] == "ok"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
