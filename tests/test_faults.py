"""Faults during real ``simpletuner train`` runs: none of them may end in a silently broken LoRA.

Each test drives the host's CLI on the tiny checkpoint and dataset (examples/demo.py) and breaks
something the way it breaks for users: the run is interrupted (Ctrl-C, SIGKILL) in the middle of
a save, a cached latent is truncated, the learning rate makes the training diverge, the
block-sparse kernel fails to launch.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
from safetensors.torch import load_file, save_file

from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import faults

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


def _train(workdir: Path, log_name: str, *args: str, **env: str) -> tuple[int, str]:
    command, environ = demo.host_command(workdir)
    command += list(args)
    environ.update(env)
    log_path = workdir / log_name
    with log_path.open("w") as log:
        code = subprocess.run(command, cwd=workdir, env=environ, stdout=log, stderr=subprocess.STDOUT).returncode
    return code, log_path.read_text(errors="replace")


def _injecting(environ: dict[str, str], **faults_env: str) -> dict[str, str]:
    """``environ`` with tests/fault_injection on PYTHONPATH and its ``LONGCAT_FAULT_*`` settings."""
    path = os.pathsep.join(filter(None, [str(INJECTION), environ.get("PYTHONPATH")]))
    return dict(environ, PYTHONPATH=path, **faults_env)


def _interrupt_save(workdir: Path, log_name: str, folder: str, when: str, how: str, *args: str) -> tuple[int, str]:
    """Start a run, wait until its LoRA save into ``folder`` pauses, then interrupt it.

    ``how`` is "ctrl-c" (SIGINT to the CLI's process group: what a terminal sends to its
    foreground job; the CLI then stops the training processes it started in a session of their
    own) or "sigkill" (the training worker alone, as the OOM killer does).
    """
    command, environ = demo.host_command(workdir)
    command += list(args)
    pauses = workdir / "pauses"
    pauses.mkdir(exist_ok=True)
    marker = pauses / folder
    marker.unlink(missing_ok=True)
    environ = _injecting(environ, LONGCAT_FAULT_PAUSE=f"{folder}:{when}", LONGCAT_FAULT_PAUSE_DIR=str(pauses))
    log_path = workdir / log_name
    with log_path.open("w") as log:
        cli = subprocess.Popen(
            command,
            cwd=workdir,
            env=environ,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # A terminal's foreground job takes SIGINT; a test started in the background inherits
            # it ignored, and Python then never raises KeyboardInterrupt.
            preexec_fn=_default_sigint,
        )
        started: list[psutil.Process] = []
        try:
            while cli.poll() is None and not (marker.exists() and marker.read_text()):
                time.sleep(0.05)
            assert marker.exists(), (
                f"the run ended before its save into {folder} paused:\n{log_path.read_text()[-3000:]}"
            )
            started = psutil.Process(cli.pid).children(recursive=True)
            if how == "ctrl-c":
                os.killpg(cli.pid, signal.SIGINT)
            else:
                os.kill(int(marker.read_text()), signal.SIGKILL)
            code = cli.wait(timeout=120)
        finally:
            for process in [*started, psutil.Process(cli.pid)] if cli.poll() is None else started:
                try:  # only what this test started, and only if the host left it running
                    process.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            cli.wait()
    return code, _plain(log_path.read_text(errors="replace"))


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _plain(log: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", log)


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

    from simpletuner_longcat_video.host import patches
    from simpletuner_longcat_video.host.family import LongCatVideo

    collate = SimpleNamespace(compute_latents=host_fetch)
    patches.check_cached_latents(collate)
    patches.check_cached_latents(collate)  # idempotent: the hook may fire once per import
    assert collate.compute_latents is not host_fetch

    class OtherFamily:
        pass

    def CheckedFamily() -> LongCatVideo:
        return object.__new__(LongCatVideo)  # the check keys on the class; nothing else is read

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


def _checkpoint(output: Path, name: str, step: int, complete: bool = True, lora: dict | None = None) -> Path:
    """A checkpoint folder as SimpleTuner 4.10.1 leaves it: complete (with .guard) or cut off."""
    folder = output / name
    folder.mkdir(parents=True)
    (folder / "training_state.json").write_text(json.dumps({"global_step": step, "epoch": 1}))
    if lora is not None:
        save_file(lora, str(folder / faults.LORA_WEIGHTS))
    if complete:
        (folder / faults.CHECKPOINT_GUARD).write_text("complete\n")
    return folder


@pytest.fixture
def fault_lines():
    """The messages faults.py logs during a test (the plugin's logger does not propagate to caplog)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    level = faults.logger.level
    faults.logger.addHandler(handler)
    faults.logger.setLevel(logging.INFO)
    yield lines
    faults.logger.removeHandler(handler)
    faults.logger.setLevel(level)


def _resume(output: Path, value: object, max_train_steps: int = 12) -> SimpleNamespace:
    return SimpleNamespace(resume_from_checkpoint=value, output_dir=str(output), max_train_steps=max_train_steps)


def test_latest_is_the_newest_complete_checkpoint(tmp_path, fault_lines):
    output = tmp_path / "output"
    _checkpoint(output, "checkpoint-2", 2, complete=False)  # older than the one chosen: not in the way
    _checkpoint(output, "checkpoint-4", 4)
    _checkpoint(output, "checkpoint-8", 8, complete=False)
    _checkpoint(output, "checkpoint-12-tmp", 12, complete=False)  # never a candidate, as in the host
    config = _resume(output, "latest")
    faults.prepare_resume(config)
    assert config.resume_from_checkpoint == "checkpoint-4"
    assert fault_lines == [
        f"LongCat-Video: checkpoint-8 in {output} is incomplete (no .guard: the save was interrupted) and is "
        "skipped; resuming from checkpoint-4"
    ]
    assert sorted(p.name for p in output.iterdir()) == [
        "checkpoint-12-tmp",
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-8",
    ]

    (output / "checkpoint-4" / faults.CHECKPOINT_GUARD).unlink()
    fault_lines.clear()
    config = _resume(output, "latest")
    faults.prepare_resume(config)
    assert config.resume_from_checkpoint is None  # the host's "not resuming": a fresh run
    assert len(fault_lines) == 1 and fault_lines[0].endswith(
        "no complete checkpoint is left: training starts at step 0"
    )
    assert "checkpoint-2, checkpoint-4, checkpoint-8 in " in fault_lines[0] and " are incomplete " in fault_lines[0]

    fault_lines.clear()
    for value in ("latest", "s3://bucket/run/checkpoint-8", None):
        config = _resume(tmp_path / "empty", value)
        faults.prepare_resume(config)
        assert config.resume_from_checkpoint == value  # left to the host
    assert fault_lines == []


def test_an_incomplete_checkpoint_named_explicitly_is_refused(tmp_path):
    output = tmp_path / "output"
    _checkpoint(output, "checkpoint-4", 4)
    _checkpoint(output, "checkpoint-8", 8, complete=False)
    with pytest.raises(LongCatVideoError) as refused:
        faults.prepare_resume(_resume(output, str(output / "checkpoint-8")))
    message = str(refused.value)
    assert f"resume_from_checkpoint = '{output / 'checkpoint-8'}': {output / 'checkpoint-8'} is incomplete" in message
    assert "Fix: use \"latest\" (the newest complete checkpoint) or one of ['checkpoint-4']" in message
    config = _resume(output, "checkpoint-4")
    faults.prepare_resume(config)
    assert config.resume_from_checkpoint == "checkpoint-4"


def test_a_finished_run_is_not_trained_again(tmp_path, fault_lines):
    output = tmp_path / "output"
    weights = {"transformer.blocks.0.attn.qkv.lora_A.weight": torch.randn(8, 16)}
    _checkpoint(output, "checkpoint-12", 12, lora=weights)
    final = output / faults.LORA_WEIGHTS

    # The final save never happened (stopped after the last checkpoint): written from it, on rank 0 only.
    with pytest.raises(SystemExit) as stopped:
        faults.prepare_resume(_resume(output, "latest"), is_main_process=False)
    assert stopped.value.code == 0 and not final.exists() and fault_lines == []
    with pytest.raises(SystemExit) as stopped:
        faults.prepare_resume(_resume(output, "latest"))
    assert stopped.value.code == 0
    assert torch.equal(
        load_file(str(final))["transformer.blocks.0.attn.qkv.lora_A.weight"], next(iter(weights.values()))
    )
    assert f"the final LoRA {final} was missing" in fault_lines[-1]

    # Finished and intact: not touched.
    before = (final.read_bytes(), final.stat().st_mtime_ns)
    with pytest.raises(SystemExit) as stopped:
        faults.prepare_resume(_resume(output, "checkpoint-12"))
    assert stopped.value.code == 0 and (final.read_bytes(), final.stat().st_mtime_ns) == before
    assert fault_lines[-1] == (
        f"LongCat-Video: the run in {output} is finished: checkpoint-12 is at step 12, max_train_steps is 12; "
        f"nothing is trained (raise max_train_steps to train further); {final} is left unchanged"
    )

    # Damaged (cut off mid-write): restored.
    final.write_bytes(before[0][: len(before[0]) // 2])
    with pytest.raises(SystemExit):
        faults.prepare_resume(_resume(output, "latest"))
    assert final.read_bytes() == (output / "checkpoint-12" / faults.LORA_WEIGHTS).read_bytes()
    assert f"the final LoRA {final} was damaged" in fault_lines[-1]

    # Another run's LoRA in output_dir (e.g. resumed from an older checkpoint since): replaced too.
    save_file({"transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(8, 16)}, str(final))
    with pytest.raises(SystemExit):
        faults.prepare_resume(_resume(output, "latest"))
    assert final.read_bytes() == (output / "checkpoint-12" / faults.LORA_WEIGHTS).read_bytes()
    assert f"the final LoRA {final} held other weights than checkpoint-12, so it was written from " in fault_lines[-1]

    # More steps asked for: an ordinary resume.
    config = _resume(output, "latest", max_train_steps=20)
    faults.prepare_resume(config)
    assert config.resume_from_checkpoint == "checkpoint-12"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted run: STEPS steps, a checkpoint every EVERY steps."""
    workdir = tmp_path_factory.mktemp("faults-reference")
    _configure(workdir)
    code, log = _train(workdir, "train.log")
    assert code == 0, log[-3000:]
    return workdir, log


def _assert_same_lora(ours: Path, theirs: Path) -> dict[str, torch.Tensor]:
    # Same seed, data order and RNG: the CPU gives bit-identical weights; 1e-6 leaves room for a
    # non-deterministic GPU kernel.
    mine, reference = _lora(ours), _lora(theirs)
    assert mine.keys() == reference.keys() and mine
    for key in mine:
        torch.testing.assert_close(mine[key], reference[key], rtol=0, atol=1e-6, msg=key)
    return mine


@slow
def test_interrupted_runs_resume_to_the_uninterrupted_lora(reference, tmp_path):
    """One run, interrupted twice, resumed to the uninterrupted run's LoRA; then started again.

    1. Ctrl-C while checkpoint-8 is being saved, before its LoRA is written (checkpoint-4 complete);
    2. ``resume_from_checkpoint: latest`` skips the incomplete checkpoint-8 and resumes from
       checkpoint-4; the worker is SIGKILLed right after the final LoRA is written;
    3. the same command again: the run is finished, nothing is trained, the LoRA file is untouched.
    The resume key is in a second config file, read through ``simpletuner train --config``;
    config/config.json (without it) stays in the folder, where plain ``simpletuner train`` reads it.
    """
    ref_dir, ref_log = reference
    output = tmp_path / "output"
    _configure(tmp_path)
    resume = json.loads((tmp_path / "config" / "config.json").read_text())
    (tmp_path / "resume.json").write_text(json.dumps(dict(resume, resume_from_checkpoint="latest")))

    code, log = _interrupt_save(tmp_path, "1-ctrl-c.log", "checkpoint-8", "before", "ctrl-c")
    assert code == 130 and "Training interrupted by user." in log, log[-3000:]
    assert (output / "checkpoint-4" / faults.CHECKPOINT_GUARD).is_file()
    partial = output / "checkpoint-8"
    # What SimpleTuner's own `latest` would pick (and fail on: no LoRA weights in it).
    assert partial.is_dir() and not (partial / faults.CHECKPOINT_GUARD).exists()
    assert not (partial / faults.LORA_WEIGHTS).exists()
    assert not (output / faults.LORA_WEIGHTS).exists()

    code, log = _interrupt_save(tmp_path, "2-resumed.log", "output", "after", "sigkill", "--config", "resume.json")
    assert code != 0
    skipped = [line for line in log.splitlines() if "incomplete (no .guard" in line]
    assert len(skipped) == 1, log[-3000:]
    assert (
        f"checkpoint-8 in {output} is incomplete (no .guard: the save was interrupted) and is skipped; " in skipped[0]
    )
    assert skipped[0].endswith("resuming from checkpoint-4")
    assert f"Loading LoRA weights from Path: {output / 'checkpoint-4'}" in log
    assert f"{EVERY}/{STEPS} [00:00<?, ?it/s]" in log  # the progress bar starts at the checkpoint's step
    losses, ref_losses = _step_losses(log), _step_losses(ref_log)
    assert sorted(losses) == list(range(EVERY + 1, STEPS + 1))
    assert losses == {step: ref_losses[step] for step in losses}
    # checkpoint-8 was written again, complete, and holds the uninterrupted run's Adam moments.
    assert (partial / faults.CHECKPOINT_GUARD).is_file()
    ours = torch.load(partial / "optimizer.bin", weights_only=False)["state"]
    theirs = torch.load(ref_dir / "output" / "checkpoint-8" / "optimizer.bin", weights_only=False)["state"]
    assert ours.keys() == theirs.keys() and ours
    for index in ours:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[index][name], theirs[index][name], rtol=0, atol=1e-6)
    resumed = _assert_same_lora(output / faults.LORA_WEIGHTS, ref_dir / "output" / faults.LORA_WEIGHTS)
    # ...and it is not trivially equal: training moved the weights away from the first checkpoint.
    first = _lora(ref_dir / "output" / f"checkpoint-{EVERY}" / faults.LORA_WEIGHTS)
    assert max(float((resumed[key] - first[key]).abs().max()) for key in resumed) > 1e-3

    # Started again: SimpleTuner 4.10.1 alone would train a 13th step and overwrite the LoRA.
    final = output / faults.LORA_WEIGHTS
    before = (final.read_bytes(), final.stat().st_mtime_ns, sorted(p.name for p in output.iterdir()))
    code, log = _train(tmp_path, "3-finished.log", "--config", "resume.json")
    assert code == 0, log[-3000:]
    log = _plain(log)
    assert f"the run in {output} is finished: checkpoint-{STEPS} is at step {STEPS}, max_train_steps is {STEPS}" in log
    assert f"nothing is trained (raise max_train_steps to train further); {final} is left unchanged" in log
    assert "step_loss" not in log and "Loading LoRA weights" not in log
    assert (final.read_bytes(), final.stat().st_mtime_ns, sorted(p.name for p in output.iterdir())) == before


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
    code, log = _train(tmp_path, "train.log", **_injecting(dict(os.environ), LONGCAT_FAULT_BSA_FAIL_AT="5"))
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
