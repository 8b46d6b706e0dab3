"""Multi-process training of the family on a CPU: two processes, gloo.

* The real host: ``simpletuner train num_processes=2 accelerate_extra_args=--multi_gpu`` with
  ``ACCELERATE_USE_CPU=1`` (``--cpu`` would make ``accelerate launch`` start one process only),
  then ``resume_from_checkpoint: latest`` with both ranks and ``fsdp_enable`` (on a CPU the host
  runs it as DDP); ``context_parallel_size: 2`` in a run of its own.
* DDP equivalence: accelerate's DDP with sample r on rank r gives the LoRA of one process with
  both samples in its batch (``tests/_dist_worker.py``: same model, LoRA, loss hooks, fixed noise).
* FSDP2: torch's ``fully_shard`` on our blocks, the same comparison, and a
  ``torch.distributed.checkpoint`` save/load that resumes to the same next step.
  The two-process comparisons share one launch (``two_processes``); the reference is one process.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, host_environ, load_demo
from safetensors.torch import load_file

from simpletuner_longcat_video.host import faults
from simpletuner_longcat_video.host.settings import warn_fsdp_inactive

slow = pytest.mark.slow
demo = load_demo()
WORKER = REPO / "tests" / "_dist_worker.py"
# Project rule for every multi-process launch (NCCL); gloo ignores them.
NCCL_SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# accelerate reads this in every worker: without it a CPU-only worker of a 2-process launch sets up
# DistributedType.NO (accelerate/state.py, PartialState._prepare_backend) and trains alone.
CPU_DIST = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **NCCL_SAFE}


def _launch(command: list[str], cwd: Path, timeout: float = 300) -> str:
    result = subprocess.run(
        command, cwd=cwd, env=host_environ(**CPU_DIST), capture_output=True, text=True, timeout=timeout
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reference: one process, both samples in one batch (accelerate, no distribution)."""
    out = tmp_path_factory.mktemp("dist-single") / "single.pt"
    _launch([sys.executable, str(WORKER), "accelerate", str(out)], out.parent)
    result = torch.load(out)
    assert result["world"] == 1
    return result


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One ``accelerate launch`` of two processes running the worker's modes one after the other
    (``all``: DDP, context parallel, DDP without the all-reduce, FSDP2): {mode: rank 0's result}.

    A worker process spends about 20 s importing before its first step; one launch for the four
    comparisons below instead of one each saves three of those pairs.
    """
    out = tmp_path_factory.mktemp("dist-two") / "all.pt"
    accelerate = Path(sys.executable).parent / "accelerate"
    _launch(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes=2", "--num_machines=1", "--mixed_precision=no",
         "--dynamo_backend=no", str(WORKER), "all", str(out)],
        out.parent,
        timeout=600,
    )  # fmt: skip
    return torch.load(out)


def test_ddp_lora_equals_single_process_with_the_doubled_batch(single_process, two_processes):
    ddp = two_processes["ddp"]
    assert (ddp["world"], ddp["distributed_type"], ddp["backend"]) == (2, "DistributedType.MULTI_CPU", "gloo")
    # The batch loss of one process equals the mean of the two ranks' losses, step after step.
    for ours, reference in zip(ddp["losses"], single_process["losses"], strict=True):
        assert math.isclose(ours, reference, rel_tol=1e-6), (ddp["losses"], single_process["losses"])
    # DDP averages the ranks' gradients: the first step's LoRA gradients are the doubled batch's.
    scale = max(float(g.abs().max()) for g in single_process["first_grads"].values())
    assert _max_diff(ddp["first_grads"], single_process["first_grads"]) < 1e-6 * scale
    assert _max_diff(ddp["lora"], single_process["lora"]) < 1e-5
    # ...and training did move the LoRA, by far more than the tolerance.
    assert _max_diff(single_process["lora"], single_process["lora_init"]) > 1e-3


def test_context_parallel_training_equals_single_process(single_process, two_processes):
    """Both ranks split the frames of the same two samples; the host's loss scaling + DDP averaging
    must give exactly the one-process LoRA update."""
    cp = two_processes["context_parallel"]
    assert cp["world"] == 2
    for ours, reference in zip(cp["losses"], single_process["losses"], strict=True):
        assert math.isclose(ours, reference, rel_tol=1e-6), (cp["losses"], single_process["losses"])
    scale = max(float(g.abs().max()) for g in single_process["first_grads"].values())
    assert _max_diff(cp["first_grads"], single_process["first_grads"]) < 1e-6 * scale
    assert _max_diff(cp["lora"], single_process["lora"]) < 1e-5


def test_ddp_comparison_fails_without_the_gradient_all_reduce(single_process, two_processes):
    """The control: each rank stepping on its own sample's gradient gives a different LoRA."""
    unsynced = two_processes["no_sync"]
    assert unsynced["world"] == 2
    assert _max_diff(unsynced["lora"], single_process["lora"]) > 1e-4


def test_fsdp2_fully_shard_matches_single_process_and_resumes_from_a_dcp_checkpoint(single_process, two_processes):
    fsdp = two_processes["fsdp2"]
    assert (fsdp["world"], fsdp["backend"]) == (2, "gloo")
    # The frozen DiT is sharded: every frozen weight is a DTensor, each rank holds about half.
    assert fsdp["sharded_frozen_params"] == fsdp["frozen_params"] > 0
    assert fsdp["frozen_local_numel"] <= fsdp["frozen_full_numel"] // 2 + 1024
    for ours, reference in zip(fsdp["losses"], single_process["losses"], strict=True):
        assert math.isclose(ours, reference, rel_tol=1e-6)
    scale = max(float(g.abs().max()) for g in single_process["first_grads"].values())
    assert _max_diff(fsdp["first_grads"], single_process["first_grads"]) < 1e-6 * scale
    assert _max_diff(fsdp["lora"], single_process["lora"]) < 1e-5
    # The checkpoint has one shard file per rank; loading it restores the trained LoRA into a
    # fresh model (which started elsewhere) and the optimiser state: the next step is identical.
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(fsdp["checkpoint_files"])
    assert _max_diff(fsdp["lora_before_load"], fsdp["lora"]) > 1e-3
    assert _max_diff(fsdp["lora_resumed"], fsdp["lora"]) == 0.0
    assert fsdp["next_loss_resumed"] == fsdp["next_loss"]
    assert _max_diff(fsdp["lora_next_resumed"], fsdp["lora_next"]) == 0.0
    assert _max_diff(fsdp["lora_next"], fsdp["lora"]) > 0.0


def _refuse_concurrently(cache_file: str, start, results) -> None:
    cache = SimpleNamespace(cache_data_backend=SimpleNamespace(type="local"))
    start.wait()
    error = faults.corrupt_latent_error(cache, "ds", "clip.mp4", cache_file, "unreadable")
    results.put(error.fix)


# The forked children only rename a file and log; nothing in them waits on a parent's thread.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_two_ranks_refusing_the_same_cache_file_both_point_at_the_moved_file(tmp_path):
    """Padded buckets can give both ranks the same sample: one moves the file, neither crashes or lies."""
    context = multiprocessing.get_context("fork")
    for attempt in range(20):
        cache_file = tmp_path / f"clip_{attempt}.pt"
        torch.save(torch.full((2,), float("nan")), cache_file)
        start, results = context.Barrier(2), context.Queue()
        ranks = [context.Process(target=_refuse_concurrently, args=(str(cache_file), start, results)) for _ in "ab"]
        for rank in ranks:
            rank.start()
        for rank in ranks:
            rank.join(30)
            assert rank.exitcode == 0
        messages = [results.get(timeout=5) for _ in ranks]
        moved = f"{cache_file}.corrupt"
        assert all(f"it was moved to {moved}" in message for message in messages), messages
        assert not cache_file.exists() and torch.load(moved).isnan().all()


def test_fsdp_warning_only_when_accelerate_did_not_enable_fsdp():
    config = SimpleNamespace(fsdp_enable=True)
    multi_cpu = SimpleNamespace(distributed_type="DistributedType.MULTI_CPU", is_main_process=True)
    assert "MULTI_CPU" in warn_fsdp_inactive(config, multi_cpu)
    assert warn_fsdp_inactive(config, SimpleNamespace(distributed_type="DistributedType.FSDP")) is None
    assert warn_fsdp_inactive(SimpleNamespace(fsdp_enable=False), multi_cpu) is None


# --- the real host ----------------------------------------------------------------------------


def _configure(workdir: Path, **changes: object) -> None:
    if not (workdir / "config" / "config.json").exists():
        demo.prepare(workdir)
    path = workdir / "config" / "config.json"
    config = json.loads(path.read_text())
    # Validation is covered by the single-process tests; here it only costs time.
    config.update(validation_disable=True)
    # The one-clip validation split cannot be divided between two ranks (the host refuses with
    # "zero usable batches"); the host's own remedy pads it.
    config.update(allow_dataset_oversubscription=True)
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def _host_train_two_processes(workdir: Path, log_name: str) -> tuple[int, str]:
    command, environ = demo.host_command(workdir)
    environ.update(CPU_DIST)
    command += ["num_processes=2", "accelerate_extra_args=--multi_gpu"]
    log_path = workdir / log_name
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=workdir, env=environ, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, re.sub(r"\x1b\[[0-9;]*m", "", log_path.read_text(errors="replace"))


def _losses(log: str) -> dict[int, float]:
    return {int(s): float(v) for s, v in re.findall(r"\| (\d+)/\d+ \[[^\]]*step_loss=([0-9.eE+-]+|nan|inf)", log)}


# Fields of the resumed run's config: FSDP asked for, and no eval split. On a CPU accelerate keeps
# MULTI_CPU (DDP), so the resume is still the DDP run's; without an eval split the host divides clips
# and start frames between the ranks separately, and the pairing rules must still see whole folders
# (data._share_file_lists). One two-process host start costs about two minutes of both cores: the
# FSDP-on-CPU checks ride on the resume instead of a run of their own.
FSDP_ON_RESUME = dict(
    eval_dataset_id=None,
    fsdp_enable=True,
    fsdp_version=2,
    fsdp_transformer_layer_cls_to_wrap="LongCatVideoTransformerBlock",
)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """Two-process host runs in one folder: 4 steps (checkpoints 2 and 4), then resumed to step 6
    with ``resume_from_checkpoint: latest`` and ``FSDP_ON_RESUME``; (folder, first log, resumed log)."""
    workdir = tmp_path_factory.mktemp("host-ddp")
    _configure(workdir, max_train_steps=4, checkpoint_step_interval=2)
    code, log = _host_train_two_processes(workdir, "train.log")
    assert code == 0, log[-4000:]
    shutil.copytree(workdir / "output", workdir / "output-after-first-run")
    _configure(workdir, max_train_steps=6, resume_from_checkpoint="latest", **FSDP_ON_RESUME)
    code, resumed = _host_train_two_processes(workdir, "resumed.log")
    assert code == 0, resumed[-4000:]
    return workdir, log, resumed


@slow
def test_host_ddp_two_processes_trains_saves_once_and_resumes(ddp_runs):
    workdir, log, resumed_log = ddp_runs
    assert "--num_processes=2" in log and "--multi_gpu" in log
    first = workdir / "output-after-first-run"
    for step in (2, 4):
        checkpoint = first / f"checkpoint-{step}"
        # Each rank's RNG and sampler state is in the checkpoint: two ranks trained.
        assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
        assert (checkpoint / "training_state-rank1.json").is_file()
    losses = _losses(log)
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values()), losses
    output = workdir / "output"
    final = output / "pytorch_lora_weights.safetensors"
    assert log.count(f"Model weights saved in {final}") == 1
    weights = load_file(str(first / final.name))
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert not list(first.rglob("*.corrupt"))

    assert f"Loading LoRA weights from Path: {output / 'checkpoint-4'}" in resumed_log
    resumed = _losses(resumed_log)
    assert sorted(resumed) == [5, 6] and all(math.isfinite(v) for v in resumed.values()), resumed
    state = json.loads((output / "checkpoint-6" / "training_state.json").read_text())
    assert state["global_step"] == 6
    assert resumed_log.count(f"Model weights saved in {final}") == 1
    assert (
        _max_diff({k: v.float() for k, v in load_file(str(final)).items()}, {k: v.float() for k, v in weights.items()})
        > 0.0
    )
    assert not list(workdir.rglob("*.corrupt"))


@slow
def test_host_context_parallel_two_processes_split_each_sample(tmp_path):
    """context_parallel_size: 2 through the real trainer: both ranks train the same samples, split."""
    _configure(tmp_path, max_train_steps=2, checkpoint_step_interval=2, context_parallel_size=2)
    code, log = _host_train_two_processes(tmp_path, "train.log")
    assert code == 0, log[-4000:]
    assert "Context parallel enabled: splitting data across 1 DP groups (cp_size=2" in log, log[-4000:]
    # Logged by the main rank; had the other rank not split too, the first all-to-all would hang.
    assert "context parallelism: 2 ranks per sample, frames split between them" in log, log[-4000:]
    losses = _losses(log)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values()), losses
    weights = load_file(str(tmp_path / "output" / "pytorch_lora_weights.safetensors"))
    assert weights and all(bool(torch.isfinite(t).all()) for t in weights.values())


@slow
def test_host_fsdp2_on_cpu_runs_as_ddp_and_says_so(ddp_runs):
    """SimpleTuner passes the FSDP plugin; accelerate keeps MULTI_CPU, so no FSDP checkpoint appears
    (the resumed run of ``ddp_runs``, with ``FSDP_ON_RESUME``)."""
    workdir, _, log = ddp_runs
    assert "fsdp_enable is set, but accelerate runs this job as MULTI_CPU" in log
    checkpoint = workdir / "output" / "checkpoint-6"
    # accelerate's FSDP save_state writes pytorch_model_fsdp_0/ and optimizer_0/; DDP writes optimizer.bin.
    assert (checkpoint / "optimizer.bin").is_file()
    assert not list(checkpoint.glob("*fsdp*")) and not (checkpoint / "optimizer_0").exists()
