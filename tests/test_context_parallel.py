"""Context parallelism on CPU: two gloo processes split one sample's frames, results equal one process.

The worker (this file with ``--worker``) runs under ``torch.distributed.run`` with 2 processes.
Every rank computes the single-process reference itself, then the same step split between the
ranks; it compares the gathered prediction, and the sum over ranks of the partial gradients
(what SimpleTuner's loss scaling and data-parallel averaging produce), with the reference.
TRITON_INTERPRET=1 lets the block-sparse Triton kernels run on the CPU inside the split attention.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from simpletuner_longcat_video.core.context_parallel import frame_counts
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host.settings import check_context_parallel_config

HERE = Path(__file__).resolve().parent
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def test_frame_counts_are_contiguous_and_balanced():
    assert frame_counts(24, 2) == (12, 12)
    assert frame_counts(21, 2) == (11, 10)
    assert frame_counts(6, 4) == (2, 2, 1, 1)
    assert sum(frame_counts(93 // 4 + 1, 8)) == 24


def test_more_ranks_than_frames_is_refused_with_the_fix():
    with pytest.raises(LongCatVideoError) as error:
        frame_counts(3, 4)
    message = str(error.value)
    assert "context_parallel_size" in message and "3 latent frames" in message and "at most 3 ranks" in message


def test_context_parallel_size_checked_against_the_checkpoint_heads(tiny_checkpoint):
    def config(size, path=str(tiny_checkpoint), frames=None):
        return SimpleNamespace(
            context_parallel_size=size, pretrained_model_name_or_path=path, validation_num_video_frames=frames
        )

    check_context_parallel_config(config(2))  # the tiny DiT has 4 heads
    check_context_parallel_config(config(None))
    with pytest.raises(LongCatVideoError, match=r"context_parallel_size = 3.*DiT has 4 heads"):
        check_context_parallel_config(config(3))
    check_context_parallel_config(config(8, path="meituan-longcat/LongCat-Video"))  # 32 heads
    with pytest.raises(LongCatVideoError, match=r"32 heads"):
        check_context_parallel_config(config(3, path="meituan-longcat/LongCat-Video"))
    with pytest.raises(LongCatVideoError, match=r"validation_num_video_frames = 5.*2 latent frames.*at least 13"):
        check_context_parallel_config(config(4, frames=5))


# -- worker side -----------------------------------------------------------------------------


def _worker_main(out_path: str) -> None:
    import torch.distributed as dist
    from test_transformer import TINY, i2v_timesteps, inputs, seeded_init

    from simpletuner_longcat_video.core import attention, attention_bsa
    from simpletuner_longcat_video.core.context_parallel import FrameShard
    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    group = dist.group.WORLD
    # On the CPU the Triton backend reports itself unavailable; under TRITON_INTERPRET=1 it runs.
    attention.load_entry_point_backends()
    attention.register_backend(dataclasses.replace(attention_bsa.BACKEND, is_available=lambda: True))
    results: dict[str, object] = {}

    def step(model, x, t, y, mask, ncl, weight):
        x = x.clone().requires_grad_()
        out = model(x, t, y, mask, num_cond_latents=ncl, return_dict=False)[0]
        loss = (out * weight).mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), loss.detach(), x.grad.detach(), grads

    def compare(name, *, frames, ncl, dtype=torch.float32, backend="sdpa", checkpointing=False, saves="none", **shape):
        model = seeded_init(LongCatVideoTransformer3DModel(**TINY), seed=3).to(dtype)
        model.set_attention_options(backend=backend, sparsity=0.5, chunk=(1, 2, 8))
        if checkpointing:
            model.enable_gradient_checkpointing()
            model.set_checkpoint_saves(saves)
        model.train()
        x, t, y, mask = inputs(batch=2, frames=frames, **shape)
        mask[1, -3:] = 0
        if ncl:
            t = i2v_timesteps(t, frames=frames, ncl=ncl)
        weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
        model.enable_context_parallel(None)
        ref = step(model, x, t, y, mask, ncl, weight)
        model.enable_context_parallel(group)
        got = step(model, x, t, y, mask, ncl, weight)
        model.enable_context_parallel(None)
        # Partial gradients summed over the group = the single-process gradient.
        got_x_grad = got[2].clone()
        dist.all_reduce(got_x_grad)
        grads = {}
        for n, g in got[3].items():
            g = g.clone()
            dist.all_reduce(g)
            grads[n] = g

        def rel(a, b):
            return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))

        results[name] = {
            "out_rel": rel(got[0], ref[0]),
            "out_max_abs": float((got[0] - ref[0]).abs().max()),
            "loss_equal_on_ranks": bool(torch.equal(got[1], ref[1])) or abs(float(got[1] - ref[1])) < 1e-4,
            "x_grad_rel": rel(got_x_grad, ref[2]),
            "param_grad_rel_max": max(rel(grads[n], ref[3][n]) for n in ref[3]),
            "params_with_grad": [len(grads), len(ref[3])],
            "local_frames": FrameShard.for_grid(group, (frames, 1, 1)).local_frames,
        }

    compare("i2v_uneven_fp32", frames=5, ncl=1)
    compare("t2v_even_fp32", frames=4, ncl=0)
    compare("i2v_checkpointed_fp32", frames=4, ncl=1, checkpointing=True)
    # Selective checkpointing keeps this rank's attention heads; the all-to-alls around it rerun.
    compare("i2v_checkpoint_saves_fp32", frames=4, ncl=1, checkpointing=True, saves="attention")
    compare("i2v_bf16", frames=5, ncl=1, dtype=torch.bfloat16)
    compare("i2v_block_sparse_fp32", frames=4, ncl=1, backend="block_sparse", height=8, width=16)
    results["block_sparse_failures"] = attention.failed_backends()

    # Round trips of the collectives themselves, uneven split (3 frames of 6 tokens, 2 of 6).
    shard = FrameShard.for_grid(group, (5, 2, 3))
    whole = torch.arange(2 * 30 * 4, dtype=torch.float32).view(2, 30, 4)
    results["gather_split_identity"] = bool(torch.equal(shard.gather(shard.split(whole, 1)), whole))
    qkv = torch.randn(3, 2, 4, 30, 8, generator=torch.Generator().manual_seed(1))
    local = shard.split(qkv, 3)
    heads = shard.seq_to_heads(local)
    per_rank_heads = 4 // shard.world
    own = qkv[:, :, rank * per_rank_heads : (rank + 1) * per_rank_heads]
    results["seq_to_heads_exact"] = bool(torch.equal(heads, own))
    results["heads_to_seq_inverse"] = all(bool(torch.equal(shard.heads_to_seq(heads[i]), local[i])) for i in range(3))

    # The host's own context-parallel set-up (accelerate + its device mesh) drives enable_parallelism.
    from accelerate import Accelerator
    from simpletuner.helpers.training.context_parallel import (
        apply_standalone_context_parallel,
        build_context_parallel_topology,
        configure_cp_only_accelerator,
    )

    accelerator = Accelerator(cpu=True)
    model = seeded_init(LongCatVideoTransformer3DModel(**TINY), seed=3)
    model.set_attention_options(backend="sdpa")
    x, t, y, mask = inputs(batch=1, frames=4)
    with torch.no_grad():
        ref = model(x, t, y, mask, return_dict=False)[0]
    host = {}
    for strategy in ("alltoall", "allgather"):
        model._simpletuner_context_parallel_enabled = False
        model.enable_context_parallel(None)
        topology = build_context_parallel_topology(object(), world_size=2, cp_size=2, strategy=strategy)
        configure_cp_only_accelerator(accelerator, topology)
        applied = apply_standalone_context_parallel(accelerator, model, topology)
        with torch.no_grad():
            out = model(x, t, y, mask, return_dict=False)[0]
        host[strategy] = {
            "applied": applied,
            "group_size": dist.get_world_size(model._cp_group),
            "max_abs": float((out - ref).abs().max()),
        }
    results["host"] = host

    # Head counts the all-to-all cannot split are refused by name.
    odd = LongCatVideoTransformer3DModel(**{**TINY, "num_heads": 1})
    try:
        odd.enable_context_parallel(group)
        results["odd_heads_error"] = ""
    except LongCatVideoError as error:
        results["odd_heads_error"] = str(error)

    if rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


# -- test side -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("cp") / "results.json"
    env = {**os.environ, **NCCL_SAFE_ENV, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        "--worker",
        str(out),
    ]
    # Not the repo root: its kernels/ folder would shadow the PyPI package of that name.
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env, cwd=str(HERE))
    assert proc.returncode == 0 and out.exists(), f"CP worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


FP32_CASES = [
    "i2v_uneven_fp32",
    "t2v_even_fp32",
    "i2v_checkpointed_fp32",
    "i2v_checkpoint_saves_fp32",
    "i2v_block_sparse_fp32",
]


@pytest.mark.parametrize("case", FP32_CASES)
def test_split_forward_and_backward_equal_one_process(cp_results, case):
    r = cp_results[case]
    assert r["out_rel"] < 1e-5 and r["loss_equal_on_ranks"], r
    assert r["x_grad_rel"] < 1e-5, r
    assert r["param_grad_rel_max"] < 1e-4, r
    assert r["params_with_grad"][0] == r["params_with_grad"][1] > 0


def test_uneven_frames_are_split_three_and_two(cp_results):
    assert cp_results["i2v_uneven_fp32"]["local_frames"] == 3  # rank 0 of 5 frames over 2 ranks


def test_bf16_split_is_within_bf16_tolerance(cp_results):
    r = cp_results["i2v_bf16"]
    assert r["out_rel"] < 2e-2 and r["x_grad_rel"] < 5e-2 and r["param_grad_rel_max"] < 5e-2, r


def test_block_sparse_kernel_ran_inside_the_split_attention(cp_results):
    # A failed launch would retire the backend and run SDPA instead, hiding the case.
    assert cp_results["block_sparse_failures"] == {}


def test_collectives_round_trip_exactly(cp_results):
    assert cp_results["gather_split_identity"]
    assert cp_results["seq_to_heads_exact"]
    assert cp_results["heads_to_seq_inverse"]


@pytest.mark.parametrize("strategy", ["alltoall", "allgather"])
def test_host_context_parallel_setup_drives_the_split(cp_results, strategy):
    r = cp_results["host"][strategy]
    assert r["applied"] is True and r["group_size"] == 2
    assert r["max_abs"] < 1e-5, r


def test_heads_that_do_not_divide_are_refused(cp_results):
    message = cp_results["odd_heads_error"]
    assert "context_parallel_size" in message and "divides the model's 1 heads" in message


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(HERE))
    _worker_main(sys.argv[2])
