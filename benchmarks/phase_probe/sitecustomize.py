"""Phase probe for ``benchmarks/full_size_run.py``; never on a user's path.

``full_size_run.py`` puts this folder on PYTHONPATH for the host's ``simpletuner train``, so
Python imports this file at start-up in every process of the run. With ``LONGCAT_PHASE_PROBE``
naming a file, it waits for the modules below to execute and wraps a few of their functions: each
wrapped call appends a start and an end event (wall time, and on CUDA the peak allocated/reserved
memory since the previous event, after which the peak is reset) to that file as JSON lines. The
wrapped code itself runs unchanged: host loop, family, pipeline, VAE, text encoder.
"""

import functools
import json
import os
import sys
import time

PATH = os.environ.get("LONGCAT_PHASE_PROBE")
# LONGCAT_PHASE_PROFILE=N: torch.profiler runs from the start of training step N to the start of step
# N + 1 (forward, backward, optimizer and the host's own work in between) and its table is written
# next to the probe file (<probe>.profile.txt), with how long the GPU sat idle in that window.
PROFILE_STEP = int(os.environ.get("LONGCAT_PHASE_PROFILE", "0") or 0)
_profile = {"steps": 0, "profiler": None, "t0": 0.0}

# module -> [(attribute path, event name)]
TARGETS = {
    "simpletuner_longcat_video.host.family": [
        ("LongCatVideo.model_predict", "step"),
        ("LongCatVideo.save_lora_weights", "lora_save"),
    ],
    "simpletuner_longcat_video.core.pipeline": [("LongCatVideoPipeline.__call__", "sampling")],
    "simpletuner_longcat_video.core.transformer": [
        ("LongCatVideoTransformer3DModel.from_pretrained", "dit_load"),
        # one event pair per DiT call: the per-step sampling time, even from a run cut short
        ("LongCatVideoTransformer3DModel.forward", "dit_forward"),
    ],
    "accelerate.accelerator": [
        ("Accelerator.save_state", "checkpoint_save"),
        ("Accelerator.load_state", "resume_load"),
    ],
    "diffusers.models.autoencoders.autoencoder_kl_wan": [
        ("AutoencoderKLWan.encode", "vae_encode"),
        ("AutoencoderKLWan.decode", "vae_decode"),
    ],
    "transformers.models.umt5.modeling_umt5": [("UMT5EncoderModel.forward", "text_encode")],
}


def record(event: str, **extra) -> None:
    entry = {"t": time.time(), "pid": os.getpid(), "event": event, **extra}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        entry["t"] = time.time()
        entry["peak_alloc"] = torch.cuda.max_memory_allocated()
        entry["peak_reserved"] = torch.cuda.max_memory_reserved()
        entry["alloc"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with open(PATH, "a") as handle:
        handle.write(json.dumps(entry) + "\n")


def _profile_step_start() -> None:
    """At each training step's start: open the profiling window at step N, close it at N + 1."""
    _profile["steps"] += 1
    if _profile["steps"] == PROFILE_STEP:
        import torch

        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        _profile["profiler"] = torch.profiler.profile(activities=activities)
        _profile["profiler"].start()
        _profile["t0"] = time.time()
    elif _profile["steps"] == PROFILE_STEP + 1:
        _profile_stop()


def _profile_stop() -> None:
    profiler = _profile.pop("profiler", None)
    if profiler is None:
        return
    profiler.stop()
    window = time.time() - _profile["t0"]
    averages = profiler.key_averages()
    # Kernels of one stream do not overlap, so the summed self device time is the GPU's busy time.
    busy = sum(getattr(a, "self_device_time_total", 0.0) for a in averages) / 1e6
    sort = "self_device_time_total" if busy > 0 else "self_cpu_time_total"
    with open(PATH + ".profile.txt", "w") as handle:
        handle.write(f"window (step {PROFILE_STEP} start to step {PROFILE_STEP + 1} start): {window:.3f} s wall\n")
        if busy > 0:
            handle.write(f"GPU busy (summed self device time): {busy:.3f} s; idle {window - busy:.3f} s\n")
        handle.write("\n")
        handle.write(averages.table(sort_by=sort, row_limit=40, max_name_column_width=80))


def _shape(value) -> list | None:
    shape = getattr(value, "shape", None)
    return list(shape) if shape is not None else None


def _wrap(owner, attribute: str, event: str) -> None:
    raw = owner.__dict__[attribute]
    is_classmethod = isinstance(raw, classmethod)
    function = raw.__func__ if is_classmethod else raw

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        first = args[1] if len(args) > 1 else next(iter(kwargs.values()), None)
        record(f"{event}_start", arg=str(first)[:200] if event.endswith("save") else None, shape=_shape(first))
        if event == "step" and PROFILE_STEP:
            _profile_step_start()
        try:
            return function(*args, **kwargs)
        finally:
            record(f"{event}_end")

    setattr(owner, attribute, classmethod(wrapper) if is_classmethod else wrapper)


def _instrument(module) -> None:
    for path, event in TARGETS[module.__name__]:
        owner_name, attribute = path.split(".")
        _wrap(getattr(module, owner_name), attribute, event)


def _chain_next_sitecustomize() -> None:
    # This file shadows any sitecustomize of the interpreter's own; run that one too.
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or ".") == here:
            continue
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_next_sitecustomize", candidate)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


_chain_next_sitecustomize()
if PATH:
    from simpletuner_longcat_video._autoload import AfterImport

    sys.meta_path.insert(0, AfterImport(dict.fromkeys(TARGETS, _instrument)))
    record("process_start", argv=sys.argv[:3])
    import atexit

    atexit.register(record, "process_exit")
    if PROFILE_STEP:
        atexit.register(_profile_stop)  # a run that ends inside the window still writes its table
