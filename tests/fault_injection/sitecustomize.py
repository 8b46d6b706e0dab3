"""Test-only fault injection and recording for host training runs; never on a user's path.

Tests put this folder on PYTHONPATH, so Python imports this file at start-up in every process of
the run (the ``simpletuner`` CLI, ``accelerate launch``, the training worker). Each part is off
unless its environment variable is set:

* ``LONGCAT_FAULT_BSA_FAIL_AT=N`` (tests/test_faults.py): once
  ``simpletuner_longcat_video.core.attention_bsa`` has been imported its availability probes say yes
  (this machine has no CUDA for the Triton kernel) and the kernel call it makes is replaced:
  launches 1..N-1 return dense attention, as a working kernel at sparsity 0 would, and launch N
  raises the error a GPU driver gives for a bad launch.
* ``LONGCAT_RECORD_DIR=<folder>`` (tests/test_i2v_training.py, tests/test_user_data.py,
  tests/test_continuation_training.py): once
  ``simpletuner_longcat_video.host.family`` has been imported, every pipeline call writes
  ``<folder>/pipeline_call_<n>.pt`` (the start image or condition frames it was given, the
  generator's state on entry, the latents the DiT sees at its first step, the size, the autocast
  and VAE dtypes) and every training batch, right after the family has put the condition into it
  (``prepare_batch_conditions``), writes ``<folder>/batch_<n>.pt`` (its files and dataset, its
  clean and noisy latents, timesteps and the number of condition frames). Only recorded, never
  changed.
* ``LONGCAT_FAULT_PAUSE=<folder>:<when>,...`` with ``LONGCAT_FAULT_PAUSE_DIR`` (tests/test_faults.py):
  the family's LoRA save into ``<folder>`` (a ``checkpoint-N`` folder, or ``output`` for the
  final LoRA) stops and waits there, so that the test can interrupt the run at exactly that
  moment. ``<when>`` is ``before`` (nothing of the LoRA written yet) or ``after`` (the LoRA
  written, the rest of the run still to come). The worker first writes its pid into
  ``$LONGCAT_FAULT_PAUSE_DIR/<folder>``, so the test knows it is there.

Everything around these points is the real code: host loop, family, attention seam, pipeline,
saves.
"""

import functools
import os
import sys
import time
from pathlib import Path

FAIL_AT = int(os.environ.get("LONGCAT_FAULT_BSA_FAIL_AT", "0") or 0)
RECORD_DIR = os.environ.get("LONGCAT_RECORD_DIR")
PAUSES = dict(item.split(":", 1) for item in os.environ.get("LONGCAT_FAULT_PAUSE", "").split(",") if ":" in item)
PAUSE_DIR = os.environ.get("LONGCAT_FAULT_PAUSE_DIR", "")


def _inject_bsa_failure(module) -> None:
    import torch.nn.functional as F

    launches = [0]

    def available():
        return module.Availability(True, "fault injection: kernel assumed compiled")

    def kernel(q, k, v, **_options):
        launches[0] += 1
        if launches[0] >= FAIL_AT:
            sys.stderr.write(f"[fault-injection] block-sparse launch #{launches[0]} fails\n")
            raise RuntimeError("CUDA error: unspecified launch failure (injected)")
        return F.scaled_dot_product_attention(q, k, v)

    import dataclasses

    module.is_available = available
    module.prerequisites = available  # the config-time check for CUDA and Triton
    module.block_sparse_attention = kernel  # looked up by the backend at each call
    # The Backend record holds its probe; the entry point reads BACKEND after this hook has run.
    module.BACKEND = dataclasses.replace(module.BACKEND, is_available=available)


def _record_calls(family) -> None:
    import numpy as np
    import torch

    counts = {"pipeline_call": 0, "batch": 0}

    def save(kind: str, record: dict) -> None:
        counts[kind] += 1
        torch.save(record, os.path.join(RECORD_DIR, f"{kind}_{counts[kind]:03d}.pt"))

    pipeline_class = family.LongCatVideoPipeline
    original_call = pipeline_class.__call__

    @functools.wraps(original_call)  # the host passes only the keywords the signature names
    def call(self, *args, **kwargs):
        generator = kwargs.get("generator")
        seen = {}

        def first_input(_module, _args, inputs):
            seen.setdefault("hidden_states", inputs["hidden_states"][:1].detach().float().cpu().clone())

        handle = self.transformer.register_forward_pre_hook(first_input, with_kwargs=True)
        image = kwargs.get("image")
        video = kwargs.get("video")
        device = self._execution_device.type
        record = {
            "image": None if image is None else np.array(image.convert("RGB")),
            "video": None if video is None else [np.array(frame.convert("RGB")) for frame in video],
            "num_condition_frames": kwargs.get("num_condition_frames"),
            "generator_state": None if generator is None else generator.get_state(),
            "size": (kwargs.get("height"), kwargs.get("width"), kwargs.get("num_frames")),
            # The host runs validation under autocast (weight_dtype) with its own VAE dtype.
            "autocast": torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
            "vae_dtype": self.vae.dtype,
        }
        try:
            return original_call(self, *args, **kwargs)
        finally:
            handle.remove()
            save("pipeline_call", {**record, **seen})

    original_conditions = family.LongCatVideo.prepare_batch_conditions

    def prepare_batch_conditions(self, batch, state):
        batch = original_conditions(self, batch, state)
        files = batch.get("filepaths") or batch.get("image_paths") or []
        save(
            "batch",
            {
                "files": [str(path) for path in files],
                "frame0": batch["latents"][:, :, :1].detach().float().cpu().clone(),
                "num_cond_latents": int(batch.get("num_cond_latents", 0) or 0),
                "data_backend_id": batch.get("data_backend_id"),
                "latents": batch["latents"].detach().float().cpu().clone(),
                "noisy_latents": batch["noisy_latents"].detach().float().cpu().clone(),
                "timesteps": batch["timesteps"].detach().float().cpu().clone(),
                "frame_timesteps": None
                if batch.get("frame_timesteps") is None
                else batch["frame_timesteps"].detach().float().cpu().clone(),
            },
        )
        return batch

    pipeline_class.__call__ = call
    family.LongCatVideo.prepare_batch_conditions = prepare_batch_conditions


def _pause(folder: str) -> None:
    (Path(PAUSE_DIR) / folder).write_text(str(os.getpid()))
    sys.stderr.write(f"[fault-injection] LoRA save into {folder} paused\n")
    time.sleep(600)  # the test interrupts the run long before this ends


def _pause_saves(module) -> None:
    save = module.LongCatVideo.save_lora_weights

    def save_lora_weights(self, *args, **kwargs):
        directory = Path(args[0] if args else kwargs["save_directory"])
        when = PAUSES.get(directory.name)
        if when == "before":
            _pause(directory.name)
        result = save(self, *args, **kwargs)
        if when == "after":
            _pause(directory.name)
        return result

    module.LongCatVideo.save_lora_weights = save_lora_weights


def _both(first, second):
    def inject(module) -> None:
        first(module)
        second(module)

    return inject


TARGETS = {}
if FAIL_AT > 0:
    TARGETS["simpletuner_longcat_video.core.attention_bsa"] = _inject_bsa_failure
if RECORD_DIR:
    TARGETS["simpletuner_longcat_video.host.family"] = _record_calls
if PAUSES and PAUSE_DIR:
    family = "simpletuner_longcat_video.host.family"  # other parts may hook the family module as well
    TARGETS[family] = _both(TARGETS[family], _pause_saves) if family in TARGETS else _pause_saves


if TARGETS:
    from simpletuner_longcat_video._autoload import AfterImport

    sys.meta_path.insert(0, AfterImport(TARGETS))
