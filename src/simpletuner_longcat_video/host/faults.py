"""Faults during training: what the family does so that none of them ends in a silently broken LoRA.

* A cached latent that cannot be read, or that holds NaN/inf, is refused with the cache file, the
  dataset and the source clip named, and moved aside as ``<file>.corrupt`` so that the host
  re-encodes it from the clip at the next start. One that does not exist at all is named as
  missing (a restart alone would not write it). SimpleTuner 4.10.1 itself dies on such a file
  with a bare unpickling error, possibly hours into a run, and never trains on it.
* A non-finite prediction is explained (which inputs, which weights) next to the batch's files;
  the host's own non-finite-loss check then stops the run (4.10.1 has no option to skip the step).
* A LoRA with non-finite weights is never written: a finite loss can still produce an update
  that overflows, which the host's loss check only notices one step later, after a save.
* ``resume_from_checkpoint`` never lands on a checkpoint whose save was interrupted, and resuming
  a run that already reached ``max_train_steps`` trains nothing (:func:`prepare_resume`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from simpletuner_longcat_video.errors import LongCatVideoError

logger = logging.getLogger("simpletuner_longcat_video.host.faults")

QUARANTINE_SUFFIX = ".corrupt"
MISSING = "missing: no cache file under this name"
_SHOWN = 3  # names listed in a message before "and N more"


def _names(items: Sequence[str]) -> str:
    shown = ", ".join(str(item) for item in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _latent_tensor(entry: Any) -> torch.Tensor | None:
    # The host caches either a bare tensor or a dict carrying it under "latents".
    if isinstance(entry, Mapping):
        entry = entry.get("latents")
    return entry if torch.is_tensor(entry) else None


def _cache_file(vae_cache: Any, filepath: str) -> str:
    return str(vae_cache.generate_vae_cache_filename(filepath)[0])


def _move_aside(cache_file: str, moved: str) -> bool:
    """Move ``cache_file`` to ``moved``; true when it is there now, by this process or another.

    Under multi-process training two ranks can hold the same sample (padded buckets) and refuse
    it at once: the rename is atomic, so exactly one of them moves the file and the other finds
    it gone. A check-then-rename would make the slower rank crash on FileNotFoundError or
    tell the user that SimpleTuner deleted a file that is in fact waiting under ``moved``.
    """
    try:
        os.replace(cache_file, moved)
    except FileNotFoundError:
        pass
    return os.path.exists(moved) and not os.path.exists(cache_file)


def corrupt_latent_error(
    vae_cache: Any, data_backend_id: str, filepath: str, cache_file: str, problem: str
) -> LongCatVideoError:
    """The named refusal for one bad cache entry; a local entry is moved aside first."""
    local = getattr(getattr(vae_cache, "cache_data_backend", None), "type", None) == "local"
    again = "start the run again (with resume_from_checkpoint: latest to keep the steps done)"
    moved = cache_file + QUARANTINE_SUFFIX
    if problem == MISSING:
        # Not damaged: looked up under a name the cache never wrote, so a restart alone finds nothing new.
        folder = getattr(vae_cache, "cache_dir", None) or os.path.dirname(cache_file)
        fix = (
            f"delete {folder} and {again}: SimpleTuner then encodes {filepath} again under the name it looks up; "
            "if this repeats, the file names SimpleTuner caches and the ones it asks for differ (report it)"
        )
    elif local and _move_aside(cache_file, moved):
        fix = f"it was moved to {moved}; {again} and SimpleTuner re-encodes it from {filepath}"
    elif local:
        fix = f"SimpleTuner already deleted it; {again} and it is re-encoded from {filepath}"
    else:
        fix = f"delete it from the cache storage, then {again}; SimpleTuner re-encodes it from {filepath}"
    error = LongCatVideoError(
        where=f"VAE cache file {cache_file} (dataset '{data_backend_id}', source {filepath})",
        value=problem,
        rule="a cached latent must load as a finite tensor; it is never trained on otherwise",
        fix=fix,
    )
    logger.error("%s", error)
    return error


def _unreadable_entry(vae_cache: Any, filepaths: Iterable[str]) -> tuple[str, str] | None:
    """The first (filepath, problem) whose cache entry the host cannot load, read one at a time."""
    for filepath in filepaths:
        try:
            entry = vae_cache.retrieve_from_cache(filepath)
        except Exception as exc:
            # torch's own message for a damaged file talks about weights_only, which misleads.
            cache_file = _cache_file(vae_cache, filepath)
            if not os.path.exists(cache_file):
                return str(filepath), MISSING
            size = os.path.getsize(cache_file)
            return str(filepath), f"unreadable: {type(exc).__name__} loading its {size} bytes (truncated or damaged)"
        if _latent_tensor(entry) is None:
            return str(filepath), "unreadable (the cache returned no tensor)"
    return None


def checked_latents(fetch: Callable[..., list], filepaths: Sequence[str], data_backend_id: str, model: Any) -> list:
    """``fetch(filepaths, data_backend_id, model)`` (the host's latent fetch), refusing bad entries."""
    from simpletuner.helpers.training.state_tracker import StateTracker

    try:
        latents = fetch(filepaths, data_backend_id, model)
    except Exception as exc:
        vae_cache = StateTracker.get_vaecache(id=data_backend_id)
        bad = _unreadable_entry(vae_cache, filepaths) if vae_cache is not None else None
        if bad is None:
            raise
        filepath, problem = bad
        cache_file = _cache_file(vae_cache, filepath)
        raise corrupt_latent_error(vae_cache, data_backend_id, filepath, cache_file, problem) from exc
    for filepath, entry in zip(filepaths, latents, strict=False):
        tensor = _latent_tensor(entry)
        if tensor is not None and bool(torch.isfinite(tensor).all()):
            continue
        vae_cache = StateTracker.get_vaecache(id=data_backend_id)
        if tensor is None:
            problem = "unreadable (the cache returned no tensor)"
        else:
            bad = int((~torch.isfinite(tensor)).sum())
            problem = f"{bad} of {tensor.numel()} values are NaN or inf"
        raise corrupt_latent_error(vae_cache, data_backend_id, str(filepath), _cache_file(vae_cache, filepath), problem)
    return latents


def _non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    return [name for name, tensor in named if torch.is_tensor(tensor) and not bool(torch.isfinite(tensor).all())]


def explain_non_finite_prediction(batch: Mapping[str, Any], weights: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Log why a prediction is NaN/inf, with the batch's files; returns the message.

    Bad inputs point at the data (a cache entry); finite inputs with non-finite or huge weights
    point at a diverged update. Called only after a non-finite output, so the scans cost nothing
    on healthy steps.
    """
    inputs = ("latents", "noisy_latents", "conditioning_latents", "encoder_hidden_states", "timesteps")
    bad_inputs = _non_finite((name, batch.get(name)) for name in inputs)
    weights = [(name, tensor.detach()) for name, tensor in weights]
    bad_weights = _non_finite(weights)
    largest = max((float(tensor.abs().max()) for _, tensor in weights if tensor.numel()), default=0.0)
    files = batch.get("filepaths")
    files = [str(f) for f in files] if files is not None else ["(the host gave no file names)"]
    if bad_inputs:
        cause = f"the batch's inputs {bad_inputs} hold NaN/inf: delete these files' cache entries"
    elif bad_weights:
        cause = (
            f"the inputs are finite, {len(bad_weights)} trainable weight tensors are not (e.g. "
            f"{_names(bad_weights)}): the training diverged; lower learning_rate or set max_grad_norm, "
            "then resume from the last checkpoint"
        )
    else:
        cause = (
            f"the inputs and the trainable weights are finite, the largest weight is {largest:.3g}: far above 1 "
            "means the training diverged (lower learning_rate or set max_grad_norm, then resume from the last "
            "checkpoint); otherwise the forward overflowed (check the base checkpoint and mixed_precision)"
        )
    message = (
        f"LongCat-Video: non-finite prediction for {_names(files)} (dataset {batch.get('data_backend_id')!r}); {cause}"
    )
    logger.error("%s", message)
    return message


def check_lora_finite(state_dicts: Mapping[str, Any], save_directory: str, last_files: Sequence[str] | None) -> None:
    """Refuse to write LoRA weights holding NaN/inf (``state_dicts``: the host's ``*_lora_layers`` kwargs)."""
    tensors = [
        (name, tensor)
        for key, layers in state_dicts.items()
        if key.endswith("_lora_layers") and isinstance(layers, Mapping)
        for name, tensor in layers.items()
    ]
    bad = _non_finite(tensors)
    if not bad:
        return
    after = f" (last batch: {_names([str(f) for f in last_files])})" if last_files else ""
    error = LongCatVideoError(
        where=f"LoRA weights to be saved in {save_directory}",
        value=f"{len(bad)} of {len(tensors)} tensors hold NaN/inf, e.g. {_names(bad)}",
        rule="a LoRA is written only with finite weights",
        fix=f"an update overflowed after the last finite step{after}; lower learning_rate or set "
        "max_grad_norm, then resume_from_checkpoint: latest (this save was refused, so the latest "
        "checkpoint still holds finite weights)",
    )
    logger.error("%s", error)
    raise error


# SimpleTuner 4.10.1 writes a checkpoint's files straight into ``checkpoint-N`` (unless
# ``checkpointing_use_tempdir`` is set) and its completion guard last
# (``simpletuner.helpers.utils.checkpoint_manager.CheckpointManager.write_guard``): a folder
# without the guard is a save that never finished.
CHECKPOINT_GUARD = ".guard"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)(?:-[A-Za-z]+)?")


@dataclass(frozen=True)
class Checkpoint:
    """One ``checkpoint-N`` folder of an output directory."""

    path: Path
    step: int

    @property
    def complete(self) -> bool:
        return (self.path / CHECKPOINT_GUARD).is_file()

    def global_step(self) -> int | None:
        """The step the checkpoint's ``training_state.json`` records (None when unreadable)."""
        try:
            return int(json.loads((self.path / "training_state.json").read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


def list_checkpoints(output_dir: str | os.PathLike) -> list[Checkpoint]:
    """The checkpoints ``resume_from_checkpoint: latest`` chooses from, oldest first.

    The same candidates as the host's ``CheckpointManager.get_latest_checkpoint``: ``checkpoint-N``
    and suffixed ones such as ``checkpoint-N-rolling``, never the ``-tmp`` folders of a save to a
    temporary directory.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        Checkpoint(entry, int(match[1]))
        for entry in root.iterdir()
        if entry.is_dir() and (match := _CHECKPOINT_NAME.fullmatch(entry.name)) and not entry.name.endswith("tmp")
    ]
    return sorted(found, key=lambda checkpoint: (checkpoint.step, checkpoint.path.name))


def _final_lora_state(final: Path, saved: Path) -> str:
    """How the final LoRA compares with the checkpoint's: "same", "missing", "damaged" or "different"."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not final.is_file():
        return "missing"
    try:
        ours = load_file(str(final))
    except (OSError, SafetensorError, ValueError):
        return "damaged"
    theirs = load_file(str(saved))
    same = ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    return "same" if same else "different"


def _finish_run(config: Any, checkpoint: Checkpoint, step: int, is_main_process: bool) -> None:
    """Leave a finished run's result alone (or restore it from its last checkpoint), then stop."""
    output_dir = Path(config.output_dir)
    final, saved = output_dir / LORA_WEIGHTS, checkpoint.path / LORA_WEIGHTS
    finished = f"the run in {output_dir} is finished: {checkpoint.path.name} is at step {step}, max_train_steps is "
    finished += f"{config.max_train_steps}; nothing is trained (raise max_train_steps to train further)"
    state = _final_lora_state(final, saved) if saved.is_file() else "same"
    if state == "same":
        kept = f"{final} is left unchanged" if final.is_file() else "output_dir is left unchanged"
        if is_main_process:
            logger.info("LongCat-Video: %s; %s", finished, kept)
    elif is_main_process:
        partial = final.with_name(final.name + ".tmp")
        shutil.copyfile(saved, partial)
        os.replace(partial, final)  # atomic: a second interruption leaves the old file or the new one
        why = {
            "missing": "was missing (the run was stopped after its last checkpoint)",
            "damaged": "was damaged (the run was stopped while it was written)",
            "different": f"held other weights than {checkpoint.path.name}",
        }[state]
        logger.warning(
            "LongCat-Video: %s; the final LoRA %s %s, so it was written from %s (the final validation was not repeated)",
            finished,
            final,
            why,
            saved,
        )
    raise SystemExit(0)


def prepare_resume(config: Any, is_main_process: bool = True) -> None:
    """Make ``resume_from_checkpoint`` safe against interrupted saves and finished runs.

    Called from the family's config check, before anything is loaded. ``latest`` becomes the
    newest *complete* checkpoint (one log line names the incomplete ones skipped); an explicitly
    named incomplete checkpoint is refused by name. If the checkpoint resumed from is already at
    ``max_train_steps``, the run stops here with exit code 0: SimpleTuner 4.10.1 would train one
    more step and overwrite the final LoRA with it.
    """
    value = getattr(config, "resume_from_checkpoint", None)
    output_dir = getattr(config, "output_dir", None)
    if not value or str(value) in ("None", "") or not output_dir or "://" in str(value):
        return  # nothing to resume, or a remote checkpoint the host downloads itself
    checkpoints = list_checkpoints(output_dir)
    if str(value) == "latest":
        complete = [checkpoint for checkpoint in checkpoints if checkpoint.complete]
        chosen = complete[-1] if complete else None
        skipped = [c.path.name for c in checkpoints if not c.complete and (chosen is None or c.step >= chosen.step)]
        if skipped:
            instead = (
                f"resuming from {chosen.path.name}"
                if chosen
                else "no complete checkpoint is left: training starts at step 0"
            )
            logger.warning(
                "LongCat-Video: %s in %s %s incomplete (no %s: the save was interrupted) and %s skipped; %s",
                ", ".join(skipped),
                output_dir,
                "is" if len(skipped) == 1 else "are",
                CHECKPOINT_GUARD,
                "is" if len(skipped) == 1 else "are",
                instead,
            )
        if chosen is None:
            config.resume_from_checkpoint = None if skipped else value
            return
        config.resume_from_checkpoint = chosen.path.name
    else:
        # The host resumes from output_dir/<the value's last path component>, whatever comes before it.
        name = os.path.basename(str(value).rstrip("/"))
        chosen = next((checkpoint for checkpoint in checkpoints if checkpoint.path.name == name), None)
        if chosen is None:
            return  # the host says it does not exist and starts a new run
        if not chosen.complete:
            complete = [checkpoint.path.name for checkpoint in checkpoints if checkpoint.complete]
            raise LongCatVideoError(
                where="resume_from_checkpoint",
                value=value,
                rule=f"{chosen.path} is incomplete: it has no {CHECKPOINT_GUARD}, which SimpleTuner writes last, "
                "so its save was interrupted",
                fix=f'use "latest" (the newest complete checkpoint) or one of {complete or "(none: start without it)"}',
            )
    step = chosen.global_step()
    max_steps = int(getattr(config, "max_train_steps", 0) or 0)
    if step is not None and max_steps > 0 and step >= max_steps:
        _finish_run(config, chosen, step, is_main_process)
