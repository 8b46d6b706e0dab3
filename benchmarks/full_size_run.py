"""The product at full size: the host's own `simpletuner train` from clips to validation video to LoRA.

Builds a **full-size random checkpoint in the official layout** (DiT from the official
``dit/config.json`` values in bf16, sharded safetensors + index written by ``save_pretrained``;
``text_encoder/`` = ``UMT5EncoderModel`` with umT5-XXL's config; a tokenizer built locally;
``vae/`` = ``AutoencoderKLWan`` with Wan 2.1's config; ``scheduler/``) and a small paired dataset
at real size (4 clips 832x480x93 with captions, their start frames as separate PNG and JPEG
files, a one-clip eval split), then runs the unmodified host CLI on the quickstart's files
(``examples/config.json`` + ``examples/multidatabackend.json``) with only paths and step counts
changed:

  main      VAE + text caching, 10 I2V LoRA steps (attention_implementation auto), checkpoints at
            steps 5 and 10, one I2V validation video at step 10 (40 steps, guidance 4.0, 832x480x93
            as the quickstart says), the final LoRA
  resume    resume_from_checkpoint latest for 2 more steps
  recipes   the memory options through the host, 3 steps each, no validation:
            musubi_blocks_to_swap 8, int8-quanto, and the lowest-memory combination

Per phase it reports wall time and peak GPU memory (torch's peak allocated / reserved inside the
training process, from ``benchmarks/phase_probe``; and the device's used memory from NVML).

    python benchmarks/full_size_run.py --stage build --root /root/lcv      # GPU machine
    python benchmarks/full_size_run.py --stage runs --root /root/lcv
    python benchmarks/full_size_run.py --tiny --stage all --root /tmp/lcv  # CPU: every code path

Results: ``<root>/results.json`` (rewritten after every run) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PROBE = Path(__file__).resolve().parent / "phase_probe"

# google/umt5-xxl's encoder (the official text_encoder/ is UMT5EncoderModel with these values).
UMT5_XXL_CONFIG = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_decoder_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
    "layer_norm_epsilon": 1e-6,
    "tie_word_embeddings": False,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
}

FULL = {"height": 480, "width": 832, "frames": 93, "clips": 4}
TINY = {"height": 64, "width": 64, "frames": 9, "clips": 4}
# What the tiny CPU run changes on top (sizes only), as examples/demo.py does.
TINY_CONFIG = {
    "validation_resolution": "64x64",
    "validation_num_video_frames": 9,
    "validation_num_inference_steps": 4,
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "framerate": 8,
}
# Step counts of the runs (the quickstart's 1000 steps, checkpoints and validations every 250 would
# not fit a lease). disable_benchmark: the host would otherwise render a second 40-step video of
# the untrained model before step 1 (it does so for a user's first run of the quickstart too).
MAIN = {
    "max_train_steps": 10,
    "checkpoint_step_interval": 5,
    "validation_steps": 10,
    "disable_benchmark": True,
}
RECIPES = {
    "default": {},  # the quickstart's config as shipped (compiled blocks, attention saves, the allocator default)
    "swap8": {"musubi_blocks_to_swap": 8},
    "int8-quanto": {"base_model_precision": "int8-quanto"},
    "lowest": {
        "base_model_precision": "int8-quanto",
        "musubi_blocks_to_swap": 24,
        "gradient_checkpointing_backend": "unsloth",
    },
    # An attempt at a 24 GB card: all but 4 blocks streamed, int8 weights, activations offloaded.
    "lowest-24": {
        "base_model_precision": "int8-quanto",
        "quantize_via": "cpu",  # the host's option: quantised on the CPU, the bf16 DiT never on the GPU
        "musubi_blocks_to_swap": 44,
        "gradient_checkpointing_backend": "unsloth",
    },
    # The 40-step 832x480x93 validation video alone: the host's base-model benchmark renders it
    # before step 1 (the main run's checkpoint config, one step after it).
    "validation": {"disable_benchmark": False, "validation_disable": False, "validation_steps": 1000},
    # The same with the distillation LoRA as the quickstart offers it: a 16-step, guidance-1 preview.
    "preview": {
        "disable_benchmark": False,
        "validation_disable": False,
        "validation_steps": 1000,
        "longcat_validation_distill_lora": "{checkpoint}/lora/cfg_step_lora.safetensors",
    },
}
RECIPE_STEPS = 3


# --------------------------------------------------------------------------------------- build


def _fill_random(model, device: str, dtype) -> None:
    """Allocate ``model`` (built on meta) on ``device`` and fill it with cheap random values."""
    import torch

    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data = param.data.to(dtype)
            if "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            elif param.ndim >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=gen)
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.zero_()


def build_full_checkpoint(root: Path) -> Path:
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from simpletuner_longcat_video import spec
    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel
    from simpletuner_longcat_video.testing.tiny import _tokenizer, build_tiny_distill_lora

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.monotonic()
    with torch.device("meta"):
        dit = LongCatVideoTransformer3DModel.from_config(spec.OFFICIAL_DIT_CONFIG)
    _fill_random(dit, device, torch.bfloat16)
    dit.save_pretrained(root / spec.DIT_SUBFOLDER, max_shard_size="10GB", safe_serialization=True)
    # The model's config is architecture only; the checkpoint keeps the official file, switches included.
    config_file = root / spec.DIT_SUBFOLDER / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **spec.OFFICIAL_DIT_CONFIG}, indent=2))
    timings["dit_s"] = time.monotonic() - start
    del dit
    torch.cuda.empty_cache() if device == "cuda" else None

    start = time.monotonic()
    config = UMT5Config(**UMT5_XXL_CONFIG)
    with torch.device("meta"):
        encoder = UMT5EncoderModel(config)
    _fill_random(encoder, device, torch.bfloat16)
    encoder.save_pretrained(root / spec.TEXT_ENCODER_SUBFOLDER, max_shard_size="10GB")
    timings["text_encoder_s"] = time.monotonic() - start
    del encoder
    _tokenizer(root / spec.TOKENIZER_SUBFOLDER)

    start = time.monotonic()
    AutoencoderKLWan().save_pretrained(root / spec.VAE_SUBFOLDER)  # diffusers' defaults are Wan 2.1's
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.FLOW_SHIFT).save_pretrained(
        root / spec.SCHEDULER_SUBFOLDER
    )
    timings["vae_scheduler_s"] = time.monotonic() - start
    start = time.monotonic()
    # lora/cfg_step_lora.safetensors in the official layout (random, rank 32): the preview recipe
    build_tiny_distill_lora(root, rank=32, std=0.01)
    timings["distill_lora_s"] = time.monotonic() - start
    sizes = {
        folder: round(sum(f.stat().st_size for f in (root / folder).rglob("*") if f.is_file()) / 2**30, 2)
        for folder in (spec.DIT_SUBFOLDER, spec.TEXT_ENCODER_SUBFOLDER, spec.VAE_SUBFOLDER)
    }
    (root / "BUILD.json").write_text(json.dumps({"timings": timings, "GiB": sizes}, indent=2))
    print(f"checkpoint built: {timings} sizes GiB {sizes}", flush=True)
    return root


def write_clip(path: Path, frames, fps: int) -> None:
    """H.264 mp4 through imageio's ffmpeg (the GPU image has imageio, not PyAV)."""
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=9, macro_block_size=16) as writer:
        for frame in frames:
            writer.append_data(frame)


def build_dataset(root: Path, geometry: dict) -> dict[str, Path]:
    """Clips + captions, start frames as separate image files under the clips' names, one eval clip."""
    from PIL import Image

    from simpletuner_longcat_video.testing.tiny import synthetic_clip

    folders = {}
    for split, count, offset in (("train", geometry["clips"], 0), ("val", 1, 100)):
        clips = root / split / "clips"
        frames = root / split / "start_frames"
        clips.mkdir(parents=True, exist_ok=True)
        frames.mkdir(parents=True, exist_ok=True)
        for index in range(offset, offset + count):
            name = f"clip_{index:03d}"
            video = synthetic_clip(index, frames=geometry["frames"], height=geometry["height"], width=geometry["width"])
            write_clip(clips / f"{name}.mp4", video, fps=16)
            (clips / f"{name}.txt").write_text(f"a red square moves {'left' if index % 2 else 'right'} slowly")
            # Start frames as users have them: separate files, PNG and JPEG mixed.
            Image.fromarray(video[0]).save(frames / f"{name}.{'jpg' if index % 2 else 'png'}", quality=95)
        folders[f"{split}_clips"], folders[f"{split}_start_frames"] = clips, frames
    return folders


def write_configs(root: Path, checkpoint: Path, folders: dict[str, Path], geometry: dict, tiny: bool) -> None:
    """The quickstart's two files with only paths, step counts (and for --tiny, sizes) changed."""
    config = json.loads((EXAMPLES / "config.json").read_text())
    config.update(MAIN)
    if tiny:
        config.update(TINY_CONFIG)
    config["pretrained_model_name_or_path"] = str(checkpoint)
    config["output_dir"] = str(root / "output")
    config["data_backend_config"] = str(root / "config" / "multidatabackend.json")
    datasets = json.loads((EXAMPLES / "multidatabackend.json").read_text())
    roles = {
        "longcat-video-train": "train_clips",
        "longcat-video-cond": "train_start_frames",
        "longcat-video-val": "val_clips",
        "longcat-video-val-cond": "val_start_frames",
    }
    for dataset in datasets:
        if dataset["id"] in roles:
            dataset["instance_data_dir"] = str(folders[roles[dataset["id"]]])
            if tiny:
                dataset.update(resolution=geometry["height"], resolution_type="pixel", minimum_image_size=32)
            if "video" in dataset:
                dataset["video"].update(num_frames=geometry["frames"], min_frames=geometry["frames"])
        for key in ("cache_dir_vae", "cache_dir"):
            if key in dataset:
                dataset[key] = str(root / dataset[key])
    (root / "config").mkdir(parents=True, exist_ok=True)
    (root / "config" / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    (root / "config" / "config.json").write_text(json.dumps(config, indent=2))


# ----------------------------------------------------------------------------------------- run


class GpuSampler:
    """Device memory in use (NVML), in all and per process, sampled every 0.2 s while a run lasts."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, int, dict[int, int]]] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # no GPU / no NVML: the torch figures from the probe remain
            self._nvml = None

    def __enter__(self) -> GpuSampler:
        if self._nvml is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        nvml = self._nvml
        while not self._stop.is_set():
            used = nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            try:
                per_pid = {
                    p.pid: int(p.usedGpuMemory or 0) for p in nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
                }
            except Exception:
                per_pid = {}
            self.samples.append((time.time(), used, per_pid))
            self._stop.wait(0.2)

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def peak(self, start: float, end: float, pid: int | None = None) -> float | None:
        """Peak in [start, end]: of ``pid`` when NVML lists it, else of the whole device."""
        inside = [(used, per_pid) for t, used, per_pid in self.samples if start <= t <= end]
        if pid is not None and any(pid in per_pid for _, per_pid in inside):
            values = [per_pid.get(pid, 0) for _, per_pid in inside]
        else:
            values = [used for used, _ in inside]
        return round(max(values) / 2**30, 2) if values else None


def edit_config(root: Path, **changes) -> None:
    path = root / "config" / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))


def run_host(root: Path, name: str, timeout: float) -> dict:
    """``simpletuner train`` in ``root`` (it reads config/config.json there), probed; returns its record."""
    probe = root / f"probe-{name}.jsonl"
    probe.unlink(missing_ok=True)
    log_path = root / f"train-{name}.log"
    simpletuner = shutil.which("simpletuner") or str(Path(sys.executable).parent / "simpletuner")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        LONGCAT_PHASE_PROBE=str(probe),
        PYTHONPATH=os.pathsep.join(filter(None, [str(PROBE), os.environ.get("PYTHONPATH")])),
    )
    start = time.time()
    with GpuSampler() as sampler, log_path.open("w") as log:
        try:
            code = subprocess.run(
                [simpletuner, "train"], cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    end = time.time()
    events = [json.loads(line) for line in probe.read_text().splitlines()] if probe.exists() else []
    record = {"name": name, "exit_code": code, "wall_s": round(end - start, 1), "log": str(log_path)}
    record.update(phases(events, sampler, start, end))
    if code != 0:
        record["log_tail"] = log_path.read_text(errors="replace")[-3000:]
    return record


def _pairs(events: list[dict], name: str) -> list[tuple[dict, dict]]:
    """(start, end) event pairs of ``name`` in order (calls of one function do not nest here)."""
    pairs, open_start = [], None
    for event in events:
        if event["event"] == f"{name}_start":
            open_start = event
        elif event["event"] == f"{name}_end" and open_start is not None:
            pairs.append((open_start, event))
            open_start = None
    return pairs


def _peak(events: list[dict], start: float, end: float, key: str) -> float | None:
    # Each event carries the peak since the previous event: the phase's peak is the largest peak
    # of the events inside it, plus the first one after it (which covers its tail).
    inside = [e for e in events if start < e["t"] <= end and key in e]
    after = [e for e in events if e["t"] > end and key in e][:1]
    values = [e[key] for e in inside + after]
    return round(max(values) / 2**30, 2) if values else None


def phases(events: list[dict], sampler: GpuSampler, run_start: float, run_end: float) -> dict:
    """Wall time and peak memory per phase of the training process (the one that ran steps)."""
    workers = {e["pid"] for e in events if e["event"].startswith("step")}
    if not workers:
        workers = {e["pid"] for e in events if e["event"].startswith(("dit_load", "vae_encode"))}
    events = [e for e in events if e["pid"] in workers]
    out: dict = {}
    if not events:
        return out
    worker = events[0]["pid"]
    process_start = next((e["t"] for e in events if e["event"] == "process_start"), events[0]["t"])
    steps = [s for s, _ in _pairs(events, "step")]
    step_ends = [e for _, e in _pairs(events, "step")]
    spans: dict[str, tuple[float, float]] = {}

    def span(label: str, pairs: list[tuple[dict, dict]]) -> None:
        if pairs:
            spans[label] = (pairs[0][0]["t"], pairs[-1][1]["t"])
            out[f"{label}_calls"] = len(pairs)
            out[f"{label}_busy_s"] = round(sum(e["t"] - s["t"] for s, e in pairs), 2)

    span("text_encode", _pairs(events, "text_encode"))
    cache_encodes = [p for p in _pairs(events, "vae_encode") if not steps or p[1]["t"] < steps[0]["t"]]
    span("vae_cache", cache_encodes)
    clip_encodes = [s["t"] for s, e in cache_encodes if s.get("shape") and len(s["shape"]) == 5 and s["shape"][2] > 1]
    if clip_encodes:
        durations = [e["t"] - s["t"] for s, e in cache_encodes if s.get("shape") and s["shape"][2] > 1]
        out["vae_encode_per_clip_s"] = round(statistics.median(durations), 2)
    span("dit_load", _pairs(events, "dit_load"))
    if steps:
        spans["startup_to_first_step"] = (process_start, steps[0]["t"])
        out["steps"] = len(steps)
        first_end = steps[1]["t"] if len(steps) > 1 else step_ends[0]["t"]
        spans["first_step"] = (steps[0]["t"], first_end)
    saves = _pairs(events, "checkpoint_save")
    span("checkpoint_save", saves)
    samplings = _pairs(events, "sampling")
    in_training = [p for p in samplings if steps and p[0]["t"] > steps[0]["t"]]
    span("validation", in_training)
    # The host's base-model benchmark: the same validation, rendered before step 1.
    span("benchmark_validation", [p for p in samplings if not steps or p[0]["t"] < steps[0]["t"]])
    span("vae_decode", _pairs(events, "vae_decode"))
    # One denoising step of a validation video (a CFG batch is one DiT call): the median DiT call
    # inside a sampling, counted also for a sampling the run's time limit cut short.
    windows = []
    for event in events:
        if event["event"] == "sampling_start":
            windows.append([event["t"], float("inf")])
        elif event["event"] == "sampling_end" and windows:
            windows[-1][1] = event["t"]
    sampling_calls = [
        e["t"] - s["t"] for s, e in _pairs(events, "dit_forward") if any(a <= s["t"] <= b for a, b in windows)
    ]
    if sampling_calls:
        out["sampling_dit_calls"] = len(sampling_calls)
        out["sampling_step_s"] = round(statistics.median(sampling_calls), 2)
        out["sampling_first_step_s"] = round(sampling_calls[0], 2)
    loads = _pairs(events, "resume_load")
    span("resume_load", loads)
    lora_saves = [p for p in _pairs(events, "lora_save") if not any(s["t"] <= p[0]["t"] <= e["t"] for s, e in saves)]
    span("final_lora_save", lora_saves[-1:])
    # Steady s/step: intervals between consecutive step starts that contain no save or validation.
    busy = [(s["t"], e["t"]) for s, e in saves + in_training]
    intervals = [
        b["t"] - a["t"]
        for a, b in zip(steps[1:], steps[2:], strict=False)
        if not any(a["t"] <= s <= b["t"] for s, _ in busy)
    ]
    if intervals:
        out["steady_s_per_step"] = round(statistics.median(intervals), 2)
        spans["steady_steps"] = (steps[1]["t"], steps[-1]["t"])
    for label, (start, end) in spans.items():
        out[f"{label}_s"] = round(end - start, 2)
        out[f"{label}_peak_alloc_GiB"] = _peak(events, start, end, "peak_alloc")
        out[f"{label}_peak_reserved_GiB"] = _peak(events, start, end, "peak_reserved")
        out[f"{label}_nvml_GiB"] = sampler.peak(start, end, worker)
    out["run_peak_alloc_GiB"] = _peak(events, run_start, run_end, "peak_alloc")
    out["run_peak_reserved_GiB"] = _peak(events, run_start, run_end, "peak_reserved")
    out["run_nvml_GiB"] = sampler.peak(run_start, run_end, worker)
    return out


def outputs(root: Path) -> dict:
    output = root / "output"
    videos = sorted(str(p.relative_to(output)) for p in output.rglob("*.mp4")) if output.is_dir() else []
    return {
        "lora": (output / "pytorch_lora_weights.safetensors").is_file(),
        "checkpoints": sorted(p.name for p in output.glob("checkpoint-*")) if output.is_dir() else [],
        "videos": videos,
    }


def save(root: Path, results: dict) -> None:
    (root / "results.json").write_text(json.dumps(results, indent=2))
    out = os.environ.get("OUT")
    if out:
        shutil.copy(root / "results.json", Path(out) / "full_size_results.json")


def recipe_workdir(root: Path, recipe: str) -> Path:
    """A copy of the main run's config, data and caches for one recipe, so concurrent runs never share
    a file the host writes (its bucket indices live in the data folders)."""
    work = root / f"recipe-{recipe}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for folder in ("config", "datasets", "cache"):
        if (root / folder).exists():
            shutil.copytree(root / folder, work / folder)
    for name in ("config.json", "multidatabackend.json"):
        path = work / "config" / name
        text = path.read_text()
        for folder in ("config", "datasets", "cache", "output"):  # not the checkpoint: it is shared
            text = text.replace(f'"{root}/{folder}', f'"{work}/{folder}')
        path.write_text(text)
    return work


def recipe_changes(recipe: str, work: Path, tiny: bool) -> dict:
    changes = dict(
        output_dir=str(work / "output"),
        max_train_steps=1 if recipe in ("validation", "preview") else RECIPE_STEPS,
        validation_disable=True,
        checkpoint_step_interval=1000,
    )
    checkpoint = work.parent / "LongCat-Video"
    changes.update(
        {
            key: value.format(checkpoint=checkpoint) if isinstance(value, str) else value
            for key, value in RECIPES[recipe].items()
        }
    )
    if tiny:
        changes.pop("musubi_blocks_to_swap", None)  # block swap streams onto a GPU: refused on a CPU
    return changes


def run_all(root: Path, groups: list[list[str]], timeout: float, tiny: bool) -> dict:
    """Run the groups one after another; the runs inside a group at the same time on the same GPU.

    A run is ``main``, ``resume`` or ``recipe:<name>``. Runs side by side report each process's own
    memory (torch's peak inside it, NVML's figure for its pid); their s/step are slowed by the
    neighbours and are marked with ``concurrent_with``.
    """
    path = root / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    results["device"] = device_name()
    works: dict[str, Path] = {}

    def one(run: str) -> None:
        if run == "main":
            results["runs"]["main"] = run_host(root, "main", timeout)
            results["runs"]["main"]["outputs"] = outputs(root)
        elif run == "resume":
            results["runs"]["resume"] = run_host(root, "resume", timeout)
            results["runs"]["resume"]["outputs"] = outputs(root)
        else:
            recipe = run.split(":", 1)[1]
            results["runs"][recipe] = run_host(works[recipe], recipe, timeout)

    for group in groups:
        # Recipe folders are copied from the main run's config before resume edits it.
        for run in group:
            if run.startswith("recipe:"):
                recipe = run.split(":", 1)[1]
                works[recipe] = recipe_workdir(root, recipe)
                edit_config(works[recipe], **recipe_changes(recipe, works[recipe], tiny))
        if "resume" in group:
            edit_config(root, max_train_steps=MAIN["max_train_steps"] + 2, resume_from_checkpoint="latest")
        threads = [threading.Thread(target=one, args=(run,)) for run in group]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if "resume" in group:
            edit_config(root, max_train_steps=MAIN["max_train_steps"], resume_from_checkpoint=None)
        if len(group) > 1:
            for run in group:
                name = run.split(":", 1)[-1]
                if name in results["runs"]:
                    results["runs"][name]["concurrent_with"] = [r.split(":", 1)[-1] for r in group if r != run]
        save(root, results)
    return results


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return f"{props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}"
        return f"CPU, torch {torch.__version__}"
    except Exception as error:
        return f"unknown ({error})"


COLUMNS = (
    ("wall_s", "wall s"),
    ("startup_to_first_step_s", "start -> step 1 s"),
    ("dit_load_s", "DiT load s"),
    ("vae_encode_per_clip_s", "VAE encode / clip s"),
    ("text_encode_busy_s", "text enc s"),
    ("first_step_s", "first step s"),
    ("steady_s_per_step", "steady s/step"),
    ("checkpoint_save_busy_s", "checkpoint saves s"),
    ("validation_s", "validation s"),
    ("benchmark_validation_s", "validation before step 1 s"),
    ("sampling_step_s", "sampling step s"),
    ("vae_decode_busy_s", "VAE decode s"),
    ("final_lora_save_s", "LoRA save s"),
    ("resume_load_s", "resume load s"),
)
MEMORY_PHASES = (
    "vae_cache",
    "text_encode",
    "first_step",
    "steady_steps",
    "checkpoint_save",
    "validation",
    "benchmark_validation",
    "vae_decode",
)


def table(results: dict) -> str:
    lines = ["| run | exit | " + " | ".join(label for _, label in COLUMNS) + " |"]
    lines.append("|" + "---|" * (len(COLUMNS) + 2))
    for name, run in results["runs"].items():
        cells = [str(run.get(key, "-")) for key, _ in COLUMNS]
        lines.append(f"| {name} | {run.get('exit_code')} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| run | phase | peak allocated GiB | peak reserved GiB | device used (NVML) GiB |")
    lines.append("|---|---|---|---|---|")
    for name, run in results["runs"].items():
        for phase in (*MEMORY_PHASES, "run"):
            keys = ("peak_alloc_GiB", "peak_reserved_GiB", "nvml_GiB")
            values = [run.get(f"{phase}_{k}") for k in keys]
            if any(v is not None for v in values):
                lines.append(f"| {name} | {phase} | " + " | ".join(str(v) for v in values) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="working folder (checkpoint, data, outputs)")
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoint and clips (CPU): every code path")
    parser.add_argument(
        "--stage",
        default="all",
        help="build | runs | all, or a comma list of main,resume,recipe:<name> (recipes: " + ",".join(RECIPES) + ")",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per host run")
    args = parser.parse_args()
    root = args.root.resolve()
    geometry = TINY if args.tiny else FULL
    stage = args.stage
    if stage in ("build", "all"):
        checkpoint = root / "LongCat-Video"
        if not (checkpoint / "BUILD.json").exists():  # written last: a half-built checkpoint is rebuilt
            shutil.rmtree(checkpoint, ignore_errors=True)
            if args.tiny:
                from simpletuner_longcat_video.testing.tiny import build_tiny_checkpoint, build_tiny_distill_lora

                build_tiny_checkpoint(checkpoint)
                build_tiny_distill_lora(checkpoint)
                (checkpoint / "BUILD.json").write_text("{}")
            else:
                build_full_checkpoint(checkpoint)
        folders = build_dataset(root / "datasets" / "longcat-video", geometry)
        write_configs(root, checkpoint, folders, geometry, args.tiny)
        print(f"built under {root}", flush=True)
    if stage == "build":
        return 0
    default = "main;resume,recipe:lowest;recipe:int8-quanto,recipe:swap8"
    spec = default if stage in ("runs", "all") else stage
    groups = [group.split(",") for group in spec.split(";")]
    results = run_all(root, groups, args.timeout, args.tiny)
    print(table(results), flush=True)
    return 0 if all(run.get("exit_code") == 0 for run in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
