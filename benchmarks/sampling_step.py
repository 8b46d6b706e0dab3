"""One CFG sampling step of the full-size LongCat-Video DiT, with and without the condition KV cache.

A sampling step is one no-grad DiT call on the CFG batch (negative and positive prompt, batch 2)
at 480x832, 93 frames (latent [2, 16, 24, 60, 104]), random bf16 weights (only speed and memory
are measured). Two tasks: image-to-video (1 condition latent frame) and video continuation with
13 condition frames (4 latent frames, upstream's generate_vc). For each, the step runs without the
cache (every block recomputes the condition tokens) and with it (the blocks run on the noisy tokens
only, attending to the cached condition keys and values); the cache pass itself (once per video)
is timed on its own.

    python benchmarks/sampling_step.py --backend sdpa            # GPU, full size
    python benchmarks/sampling_step.py --backend block_sparse --compile
    python benchmarks/sampling_step.py --tiny                    # CPU, tiny config (smoke test)

Prints a markdown table; with $OUT set, also writes $OUT/sampling_step.json.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_step import Timer, build_model, device_and_config, write_result  # noqa: E402

TASKS = {"i2v": 1, "continuation-13": 13}  # condition pixel frames


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test of this script)")
    p.add_argument("--backend", default="auto", help="attention backend (auto, sdpa, xformers, block_sparse)")
    p.add_argument("--compile", action="store_true", help="torch.compile every block (compile_blocks, static shapes)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up ones (median reported)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--text-valid", type=int, default=100, help="valid tokens of the positive prompt")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    return p.parse_args()


def make_inputs(args, cfg: dict, cond_frames: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    t, h, w = (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8
    ncl = (cond_frames - 1) // 4 + 1
    video = torch.randn(1, cfg["in_channels"], t, h, w, generator=gen, device=device, dtype=dtype)
    latents = torch.cat([video, video])  # one video, both CFG branches
    timesteps = torch.full((2, t), 700.0, device=device)
    timesteps[:, :ncl] = 0.0
    text = torch.randn(2, 1, args.text_len, cfg["caption_channels"], generator=gen, device=device, dtype=dtype)
    mask = torch.zeros(2, args.text_len, dtype=torch.long, device=device)
    mask[0, :1] = 1  # the empty negative prompt: its end token
    mask[1, : args.text_valid] = 1
    return latents, timesteps, text, mask, video[:, :, :ncl], ncl, t


def median_seconds(fn, device: torch.device, steps: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(steps):
        with Timer(device) as timer:
            fn()
        times.append(timer.seconds)
    return statistics.median(times), times


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


@torch.no_grad()
def measure_task(model, args, cfg: dict, task: str, device: torch.device, dtype: torch.dtype) -> dict:
    latents, timesteps, text, mask, cond, ncl, frames = make_inputs(args, cfg, TASKS[task], device, dtype)

    def uncached():
        return model(latents, timesteps, text, mask, ncl, return_dict=False)[0]

    reset_peak(device)
    started = time.perf_counter()
    uncached()  # warm-up: kernels, autotuning, and with --compile the compile
    first_uncached_s = time.perf_counter() - started
    uncached_s, uncached_times = median_seconds(uncached, device, args.steps)
    uncached_peak = peak_gib(device)

    reset_peak(device)
    cache = model.condition_cache(cond, total_frames=frames)  # warm-up of the cache pass
    cache_s, _ = median_seconds(lambda: model.condition_cache(cond, total_frames=frames), device, 1)
    cache_bytes = sum(k.numel() * k.element_size() for k in (*cache.keys, *cache.values))

    def cached():
        return model(latents, timesteps, text, mask, ncl, return_dict=False, condition_cache=cache)[0]

    started = time.perf_counter()
    out = cached()
    first_cached_s = time.perf_counter() - started
    cached_s, cached_times = median_seconds(cached, device, args.steps)
    cached_peak = peak_gib(device)
    reference = uncached()
    rel = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
    return {
        "task": task,
        "condition_frames": TASKS[task],
        "condition_latents": ncl,
        "uncached_step_s": uncached_s,
        "cached_step_s": cached_s,
        "speedup": uncached_s / cached_s,
        "cache_pass_s": cache_s,
        "cache_mib": cache_bytes / 2**20,
        "first_uncached_call_s": first_uncached_s,
        "first_cached_call_s": first_cached_s,
        "uncached_times_s": uncached_times,
        "cached_times_s": cached_times,
        "peak_uncached_gib": uncached_peak,
        "peak_cached_gib": cached_peak,
        "rel_cached_vs_uncached": rel,
    }


def main() -> None:
    args = parse_args()
    device, dtype, config = device_and_config(args, tiny_frames=17)  # 17 frames: 5 latents, 4 of them condition
    config["text_tokens_zero_pad"] = True  # the official dit/config.json
    tasks = [task for task in args.tasks.split(",") if task]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"--tasks {unknown}: known tasks are {', '.join(TASKS)}")

    t0 = time.perf_counter()
    model = build_model(config, device, dtype, lora_rank=0).eval()
    build_s = time.perf_counter() - t0
    model.set_attention_options(backend=args.backend)
    if args.compile:
        # One static graph per shape: the rows call the blocks with four shapes (two tasks, with and
        # without the cache), and with automatic dynamic shapes the fourth compile failed on CPU
        # (InductorError: LoweringException: ValueError: Exponent must be non-negative, in the SDPA
        # stride constraint under symbolic sizes; torch 2.13). Static graphs also time what a
        # sampling of one shape runs.
        model.compile_blocks(dynamic=False)
    cfg = dict(model.config)
    rows = [measure_task(model, args, cfg, task, device, dtype) for task in tasks]

    from simpletuner_longcat_video.core import attention

    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "tiny": args.tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": args.backend,
        "compiled_blocks": args.compile,
        "failed_backends": attention.failed_backends(),
        "latent_shape": [2, cfg["in_channels"], (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8],
        "text_tokens": args.text_len,
        "build_s": build_s,
        "rows": rows,
    }

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    print(
        f"\n{result['device']}, {args.width}x{args.height}x{args.frames}, CFG batch 2, backend {args.backend}"
        f"{', compiled blocks' if args.compile else ''}, median of {args.steps} steps\n"
    )
    print(
        "| task | cond latents | step, no cache (s) | step, KV cache (s) | speed-up | cache pass (s) | cache (MiB) "
        "| peak no cache / cache (GiB) | rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['task']} | {row['condition_latents']} | {row['uncached_step_s']:.3f} | {row['cached_step_s']:.3f} "
            f"| {row['speedup']:.2f}x | {row['cache_pass_s']:.3f} | {row['cache_mib']:.1f} "
            f"| {fmt(row['peak_uncached_gib'], '.1f')} / {fmt(row['peak_cached_gib'], '.1f')} "
            f"| {row['rel_cached_vs_uncached']:.1e} |"
        )
    if result["failed_backends"]:
        print(f"\nbackends retired during the run: {result['failed_backends']}")

    write_result("sampling_step.json", result)


if __name__ == "__main__":
    main()
