"""Faults during real ``simpletuner train`` runs: none of them may end in a silently broken LoRA.

Each test drives the host's CLI on the tiny checkpoint and dataset (examples/demo.py) and breaks
something the way it breaks for users: the process is SIGKILLed, a cached latent is truncated,
the learning rate makes the training diverge, the block-sparse kernel fails to launch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import REPO, load_demo
from safetensors.torch import load_file

from simpletuner_longcat_video import faults
from simpletuner_longcat_video.errors import LongCatVideoError

slow = pytest.mark.slow
demo = load_demo()

STEPS, EVERY = 12, 4  # 4 clips, batch 1: three epochs, a checkpoint after each
INJECTION = REPO / "tests" / "fault_injection"


def _configure(workdir: Path, **changes: object) -> None:
    """The demo's workdir without validation (it costs time and is tested elsewhere), plus ``changes``."""
    if not (workdir / "config" / "config.json").exists():
        demo.prepare(workdir)
    path = workdir / "config" / "config.json"
    config = json.loads(path.read_text())
    config.pop("eval_dataset_id", None)
    config.update(validation_disable=True, validation_using_datasets=False)
    config.update(max_train_steps=STEPS, checkpoint_step_interval=EVERY)
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def _train(workdir: Path, log_name: str, **env: str) -> tuple[int, str]:
    command, environ = demo.host_command(workdir)
    environ.update(env)
    log_path = workdir / log_name
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=workdir, env=environ, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, log_path.read_text(errors="replace")


def _is_training_worker(process: psutil.Process) -> bool:
    try:
        return any(arg.endswith("train.py") for arg in process.cmdline())
    except psutil.Error:  # gone, or a zombie already
        return False


def _train_and_kill(workdir: Path, log_name: str, after_checkpoint: int) -> None:
    """Start a run and SIGKILL its training worker once ``checkpoint-N`` is complete on disk."""
    command, environ = demo.host_command(workdir)
    # A checkpoint is written as checkpoint-N-tmp and renamed after its completion guard.
    done = workdir / "output" / f"checkpoint-{after_checkpoint}" / ".guard"
    with (workdir / log_name).open("w") as log:
        cli = subprocess.Popen(command, cwd=workdir, env=environ, stdout=log, stderr=subprocess.STDOUT)
        try:
            while cli.poll() is None and not done.exists():
                time.sleep(0.02)
        finally:
            # The CLI starts `accelerate launch` in a session of its own: kill the worker by pid
            # (as the OOM killer would), then whatever is left of the processes this test started.
            started = psutil.Process(cli.pid).children(recursive=True) if cli.poll() is None else []
            workers = [p for p in started if _is_training_worker(p)]
            for process in workers + started:
                try:
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            cli.wait()
    assert done.exists(), f"the run ended before checkpoint-{after_checkpoint} was written"


def _lora(path: Path) -> dict[str, torch.Tensor]:
    return {key: tensor.float() for key, tensor in load_file(str(path)).items()}


def _all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return bool(weights) and all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())


def _step_losses(log: str) -> dict[int, str]:
    """Step -> loss as the progress bar printed it (the last print of each step)."""
    return {int(step): loss for step, loss in re.findall(r"\| (\d+)/\d+ \[[^\]]*step_loss=([^\],]+)", log)}


class LocalCacheStandIn:
    """The three things the latent check asks of the host's VAECache, over one real file."""

    cache_data_backend = SimpleNamespace(type="local")

    def __init__(self, cache_file: Path) -> None:
        self.cache_file = cache_file

    def generate_vae_cache_filename(self, filepath: str) -> tuple[str, str]:
        return str(self.cache_file), self.cache_file.name

    def retrieve_from_cache(self, filepath: str) -> torch.Tensor:
        return torch.load(self.cache_file)


@pytest.fixture
def registered_cache(tmp_path):
    from simpletuner.helpers.training.state_tracker import StateTracker

    cache = LocalCacheStandIn(tmp_path / "clip_007.pt")
    StateTracker.register_data_backend({"id": "faults-unit", "vaecache": cache})
    yield cache
    StateTracker.data_backends.pop("faults-unit", None)


def test_cache_entry_holding_nan_is_refused_and_moved_aside(registered_cache):
    latent = torch.randn(16, 3, 8, 8)
    latent[0, 1, 2, 3] = float("nan")
    torch.save(latent, registered_cache.cache_file)

    def host_fetch(filepaths, data_backend_id, model):
        return [registered_cache.retrieve_from_cache(fp) for fp in filepaths]

    with pytest.raises(LongCatVideoError) as refused:
        faults.checked_latents(host_fetch, ["/data/clips/clip_007.mp4"], "faults-unit", model=None)
    message = str(refused.value)
    assert f"VAE cache file {registered_cache.cache_file} (dataset 'faults-unit', source /data/clips/clip_007.mp4)" in (
        message
    )
    assert "'1 of 3072 values are NaN or inf'" in message
    moved = Path(f"{registered_cache.cache_file}.corrupt")
    assert f"it was moved to {moved}" in message
    assert not registered_cache.cache_file.exists() and torch.load(moved).isnan().sum() == 1


def test_cache_entry_that_was_never_written_is_named_missing(registered_cache):
    # What SimpleTuner 4.10.1 did with a relative instance_data_dir: a start-frame latent looked up
    # under another name than it was written. Restarting alone never helps, so the fix says more.
    def host_fetch(filepaths, data_backend_id, model):
        return [registered_cache.retrieve_from_cache(fp) for fp in filepaths]

    with pytest.raises(LongCatVideoError) as refused:
        faults.checked_latents(host_fetch, ["/data/start_frames/clip_007.png"], "faults-unit", model=None)
    error = refused.value
    assert error.value == "missing: no cache file under this name"
    assert f"delete {registered_cache.cache_file.parent} and start the run again" in error.fix
    assert "already deleted" not in error.fix and "bytes" not in str(error)


def test_latent_check_leaves_other_families_and_finite_latents_alone(registered_cache):
    latent = torch.randn(16, 3, 8, 8)
    torch.save(latent, registered_cache.cache_file)
    served = []

    def host_fetch(filepaths, data_backend_id, model):
        served.append(list(filepaths))
        return [registered_cache.retrieve_from_cache(fp) for fp in filepaths]

    collate = SimpleNamespace(compute_latents=host_fetch)
    faults.install_latent_check(collate)
    faults.install_latent_check(collate)  # idempotent: the hook may fire once per import
    assert collate.compute_latents is not host_fetch

    class OtherFamily:
        pass

    class CheckedFamily:
        CHECKS_CACHED_LATENTS = True

    for model in (OtherFamily(), CheckedFamily()):
        (out,) = collate.compute_latents(["/data/clips/clip_007.mp4"], "faults-unit", model)
        assert torch.equal(out, latent)
    assert len(served) == 2
    latent[0, 0, 0, 0] = float("inf")
    torch.save(latent, registered_cache.cache_file)
    (out,) = collate.compute_latents(["/data/clips/clip_007.mp4"], "faults-unit", OtherFamily())
    assert torch.isinf(out).sum() == 1  # the host's behaviour, unchanged for other families
    with pytest.raises(LongCatVideoError, match="1 of 3072 values are NaN or inf"):
        collate.compute_latents(["/data/clips/clip_007.mp4"], "faults-unit", CheckedFamily())


def test_lora_is_written_only_with_finite_weights(tmp_path):
    layers = {f"blocks.{i}.attn.qkv.lora_B.weight": torch.randn(4, 8) for i in range(5)}
    faults.check_lora_finite({"transformer_lora_layers": layers}, str(tmp_path), None)
    layers["blocks.3.attn.qkv.lora_B.weight"][1, 2] = float("-inf")
    with pytest.raises(LongCatVideoError) as refused:
        faults.check_lora_finite({"transformer_lora_layers": layers}, str(tmp_path), ["/data/clips/clip_001.mp4"])
    message = str(refused.value)
    assert f"LoRA weights to be saved in {tmp_path} = '1 of 5 tensors hold NaN/inf" in message
    assert "blocks.3.attn.qkv.lora_B.weight" in message and "(last batch: /data/clips/clip_001.mp4)" in message


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted run: STEPS steps, a checkpoint every EVERY steps."""
    workdir = tmp_path_factory.mktemp("faults-reference")
    _configure(workdir)
    code, log = _train(workdir, "train.log")
    assert code == 0, log[-3000:]
    return workdir, log


@slow
def test_sigkilled_run_resumes_to_the_uninterrupted_lora(reference, tmp_path):
    ref_dir, ref_log = reference
    _configure(tmp_path)
    _train_and_kill(tmp_path, "killed.log", after_checkpoint=EVERY)
    output = tmp_path / "output"
    assert not (output / "pytorch_lora_weights.safetensors").exists(), "killed too late: the run had finished"
    checkpoints = sorted(int(p.name.split("-")[1]) for p in output.glob("checkpoint-*") if (p / ".guard").exists())
    resumed_from = checkpoints[-1]
    assert EVERY <= resumed_from < STEPS

    _configure(tmp_path, resume_from_checkpoint="latest")
    code, log = _train(tmp_path, "resumed.log")
    assert code == 0, log[-3000:]
    assert f"Loading LoRA weights from Path: {output / f'checkpoint-{resumed_from}'}" in log
    # The progress bar starts at the checkpoint's step (the host logs the resume step only at DEBUG).
    assert f"{resumed_from}/{STEPS} [00:00<?, ?it/s]" in log
    # The step counter continues: only the steps after the checkpoint run again, with A's losses.
    losses, ref_losses = _step_losses(log), _step_losses(ref_log)
    assert sorted(losses) == list(range(resumed_from + 1, STEPS + 1))
    assert losses == {step: ref_losses[step] for step in losses}
    final = json.loads((output / f"checkpoint-{STEPS}" / "training_state.json").read_text())
    assert final["global_step"] == STEPS

    # The optimizer state continued: the resumed run's later checkpoint holds A's Adam moments.
    later = next(step for step in range(resumed_from + EVERY, STEPS + 1, EVERY))
    ours = torch.load(output / f"checkpoint-{later}" / "optimizer.bin", weights_only=False)["state"]
    theirs = torch.load(ref_dir / "output" / f"checkpoint-{later}" / "optimizer.bin", weights_only=False)["state"]
    assert ours.keys() == theirs.keys() and ours
    for index in ours:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[index][name], theirs[index][name], rtol=0, atol=1e-6)

    # Same seed, same data order, same RNG: the final LoRA equals the uninterrupted one (the CPU
    # gives bit-identical weights; 1e-6 leaves room for a non-deterministic GPU kernel).
    resumed = _lora(output / "pytorch_lora_weights.safetensors")
    uninterrupted = _lora(ref_dir / "output" / "pytorch_lora_weights.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)
    # ...and it is not trivially equal: training moved the weights away from the first checkpoint.
    first = _lora(ref_dir / "output" / f"checkpoint-{EVERY}" / "pytorch_lora_weights.safetensors")
    assert max(float((resumed[key] - first[key]).abs().max()) for key in resumed) > 1e-3


@slow
def test_truncated_cache_entry_is_refused_by_name_then_re_encoded(reference):
    workdir, _ = reference
    cache_file = sorted((workdir / "cache" / "vae" / "longcat-video" / "train" / "clips").glob("*.pt"))[0]
    size = cache_file.stat().st_size
    cache_file.write_bytes(cache_file.read_bytes()[: size // 2])
    _configure(workdir, output_dir=str(workdir / "output-corrupt"))

    code, log = _train(workdir, "corrupt.log")
    assert code != 0
    quarantined = Path(f"{cache_file}.corrupt")
    assert f"VAE cache file {cache_file} (dataset 'longcat-video-train', source " in log
    assert f"= 'unreadable: UnpicklingError loading its {size // 2} bytes (truncated or damaged)'" in log
    assert "a cached latent must load as a finite tensor" in log and f"it was moved to {quarantined}" in log
    assert quarantined.stat().st_size == size // 2 and not cache_file.exists()
    assert not (workdir / "output-corrupt" / "pytorch_lora_weights.safetensors").exists()
    source = re.search(rf"VAE cache file {re.escape(str(cache_file))} \(dataset '[^']+', source ([^)]+)\)", log)
    assert source and Path(source[1]).is_file() and "/train/clips/" in source[1]
    # The host names cache entries by the sha256 of the clip's stem: the named clip is the right one.
    assert hashlib.sha256(Path(source[1]).stem.encode()).hexdigest() == cache_file.stem

    # The next start re-encodes the entry from its clip, and the run trains to the end.
    code, log = _train(workdir, "re-encoded.log")
    assert code == 0, log[-3000:]
    assert cache_file.is_file() and cache_file.stat().st_size > size // 2
    losses = _step_losses(log)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(float(v)) for v in losses.values())


@slow
def test_diverging_loss_stops_the_run_naming_the_batch(tmp_path):
    # A learning rate of 1e30 makes the first update finite but enormous; the second step's
    # prediction overflows. The host stops on the non-finite loss (4.10.1 has no skip option).
    _configure(tmp_path, learning_rate=1e30, checkpoint_step_interval=1)
    code, log = _train(tmp_path, "train.log")
    assert code != 0
    host = re.search(r"Non-finite training loss detected \(loss=(nan|inf|-inf), .*filepaths=\[([^\]]*)\]", log)
    assert host, log[-3000:]
    files = re.findall(r"'([^']+\.mp4)'", host[2])
    assert files and all("/train/clips/clip_" in f for f in files)
    ours = [line for line in log.splitlines() if "LongCat-Video: non-finite prediction for" in line]
    assert len(ours) == 1 and all(f in ours[0] for f in files)
    assert "the inputs and the trainable weights are finite, the largest weight is" in ours[0]
    assert float(re.search(r"the largest weight is ([0-9.e+]+)", ours[0])[1]) > 1e20

    assert sorted(_step_losses(log)) == [1]
    output = tmp_path / "output"
    assert not (output / "pytorch_lora_weights.safetensors").exists()
    saved = sorted(output.rglob("*.safetensors"))
    assert [p.parent.name for p in saved] == ["checkpoint-1"]
    assert _all_finite(_lora(saved[0]))


@slow
def test_update_that_overflows_is_never_saved_as_a_lora(tmp_path):
    # A learning rate of 1e40 overflows the bf16 LoRA weights in the first update while its loss
    # is finite; without the family's check the host saves that LoRA and exits 0.
    _configure(tmp_path, learning_rate=1e40, max_train_steps=1, checkpoint_step_interval=1)
    code, log = _train(tmp_path, "train.log")
    assert code != 0
    refusal = re.search(
        r"LoRA weights to be saved in (\S+) = '(\d+) of (\d+) tensors hold NaN/inf, e\.g\. ([^']+)'", log
    )
    assert refusal, log[-3000:]
    assert Path(refusal[1]).parent == tmp_path / "output" and 0 < int(refusal[2]) <= int(refusal[3])
    assert "lora_B" in refusal[4]
    assert "a LoRA is written only with finite weights" in log and "(last batch: " in log
    assert re.search(r"\(last batch: [^)]*/train/clips/clip_\d+\.mp4", log)
    assert sorted((tmp_path / "output").rglob("*.safetensors")) == []


@slow
def test_block_sparse_launch_failure_mid_run_falls_back_to_sdpa(tmp_path):
    # The tiny DiT has 2 blocks: 2 block-sparse launches per step (the condition frame is dense),
    # so launch 5 is the first of step 3. See tests/fault_injection/sitecustomize.py.
    _configure(tmp_path, attention_implementation="block_sparse", max_train_steps=6, checkpoint_step_interval=6)
    path = os.pathsep.join(filter(None, [str(INJECTION), os.environ.get("PYTHONPATH")]))
    code, log = _train(tmp_path, "train.log", PYTHONPATH=path, LONGCAT_FAULT_BSA_FAIL_AT="5")
    assert code == 0, log[-3000:]
    assert "LongCat-Video attention: block_sparse" in log
    assert log.count("[fault-injection] block-sparse launch #") == 1
    assert "[fault-injection] block-sparse launch #5 fails" in log
    fallback = [line for line in log.splitlines() if "falling back to sdpa" in line]
    assert len(fallback) == 1 and "attention backend 'block_sparse' raised RuntimeError" in fallback[0]
    # Mid-run: two steps trained through the backend before it failed, the rest on SDPA.
    before = log[: log.index("[fault-injection] block-sparse launch #5 fails")]
    assert max(_step_losses(before)) == 2
    losses = _step_losses(log)
    assert sorted(losses) == list(range(1, 7)) and all(math.isfinite(float(v)) for v in losses.values())
    assert _all_finite(_lora(tmp_path / "output" / "pytorch_lora_weights.safetensors"))
