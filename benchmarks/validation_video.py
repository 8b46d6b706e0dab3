"""A validation video at full size through the plugin's pipeline: wall time per phase and peak memory.

What the host's validation runs, without the host around it: the full-size DiT (random bf16
weights, LoRA rank 8 as in training), the Wan 2.1 VAE (random), precomputed prompt states (the host
caches them before training, so the text encoder is not part of a validation), image-to-video at
832x480x93 from a start image. Rows:

  cfg40    40 steps, guidance 4.0 (the quickstart's validation; both CFG branches in one batch)
  preview  16 steps on the distillation grid, guidance 1.0 (the distill-LoRA preview's sampling; the
           LoRA's weights do not change the time)

Each row runs once after a warm-up call of the same row at 2 steps (that compiles the sampling
graph when blocks are compiled), and reports total seconds including the VAE decode, DiT seconds
per step (median), decode seconds and peak allocated memory.

    python benchmarks/validation_video.py --backend auto --compile     # GPU
    python benchmarks/validation_video.py --tiny                       # CPU smoke test

With $OUT set, writes $OUT/validation_video.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_step import TINY_CONFIG, build_model  # noqa: E402

from simpletuner_longcat_video import spec  # noqa: E402
from simpletuner_longcat_video.core.attention import AttentionOptions  # noqa: E402
from simpletuner_longcat_video.core.pipeline import LongCatVideoPipeline  # noqa: E402

ROWS = {"cfg40": dict(steps=40, guidance=4.0, distill=False), "preview": dict(steps=16, guidance=1.0, distill=True)}
TARGETS_S = {"cfg40": 150.0, "preview": 45.0}  # issue 18, H200, 832x480x93


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="cfg40,preview")
    p.add_argument("--backend", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT blocks (the CUDA default)")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the condition frame at every step")
    p.add_argument("--tiny", action="store_true")
    return p.parse_args()


class StepClock:
    """Times each DiT call (synchronised), so the per-step figure excludes the VAE."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.times: list[float] = []
        self.device = device
        self._started = 0.0
        model.register_forward_pre_hook(self._pre)
        model.register_forward_hook(self._post)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _pre(self, *_: object) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _post(self, *_: object) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._started)


def build_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LongCatVideoPipeline:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    config = dict(TINY_CONFIG) if args.tiny else {}
    config["text_tokens_zero_pad"] = True  # the official dit/config.json
    dit = build_model(config, device, dtype, lora_rank=8)
    dit.set_attention_options(AttentionOptions(backend=args.backend))
    if args.compile:
        dit.compile_blocks()
    vae_config = dict(base_dim=8, num_res_blocks=1) if args.tiny else {}  # diffusers' defaults are Wan 2.1's
    vae = AutoencoderKLWan(**vae_config).to(device=device, dtype=dtype).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.FLOW_SHIFT)
    return LongCatVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit, scheduler=scheduler)


def run_row(pipe, name: str, args, size, device, dtype, clock: StepClock) -> dict:
    height, width, frames = size
    row = ROWS[name]
    caption_channels = pipe.transformer.config.caption_channels
    gen = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(1, spec.TEXT_MAX_TOKENS if not args.tiny else 16, caption_channels, generator=gen).to(
        device, dtype
    )
    mask = torch.zeros(1, text.shape[1], dtype=torch.long, device=device)
    mask[:, : min(100, text.shape[1] // 2)] = 1
    image = torch.rand(1, 3, height, width, generator=gen)  # a start image in 0..1, as the host hands it

    def call(steps: int):
        kwargs = {} if not args.no_kv_cache else {"use_kv_cache": False}
        return pipe(
            image=image,
            prompt_embeds=text,
            prompt_attention_mask=mask,
            negative_prompt_embeds=torch.zeros_like(text),
            negative_prompt_attention_mask=mask,
            height=height,
            width=width,
            num_frames=frames,
            num_inference_steps=steps,
            guidance_scale=row["guidance"],
            use_distill=row["distill"],
            generator=torch.Generator(device="cpu").manual_seed(1),
            output_type="np",
            show_progress=False,
            **kwargs,
        )

    started = time.perf_counter()
    call(2)  # warm-up: compiles the sampling graph, autotunes the kernels
    warmup_s = time.perf_counter() - started
    clock.times.clear()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    video = call(row["steps"]).frames
    if device.type == "cuda":
        torch.cuda.synchronize()
    total_s = time.perf_counter() - started
    dit_s = sum(clock.times)
    result = {
        "row": name,
        "size": f"{width}x{height}x{frames}",
        "steps": row["steps"],
        "guidance": row["guidance"],
        "warmup_2_steps_s": warmup_s,
        "total_s": total_s,
        "dit_s_per_step": statistics.median(clock.times),
        "dit_calls": len(clock.times),
        "rest_s (VAE encode+decode, scheduler)": total_s - dit_s,
        "video_shape": list(video.shape),
    }
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    target = TARGETS_S.get(name)
    if target and not args.tiny:
        result["target"] = f"{'PASS' if total_s <= target else 'MISS'} {total_s:.1f} s <= {target} s"
    return result


def main() -> int:
    args = parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    size = (64, 64, 9) if args.tiny else (480, 832, 93)
    pipe = build_pipeline(args, device, dtype)
    clock = StepClock(pipe.transformer, device)
    results = []
    for name in args.rows.split(","):
        results.append(run_row(pipe, name, args, size, device, dtype, clock))
        print(json.dumps(results[-1]), flush=True)
    label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"\n## Validation video, {label}, backend {args.backend}, compiled {args.compile}, "
        f"KV cache {not args.no_kv_cache}\n"
    )
    print("| row | size | steps | guidance | total s (incl. VAE) | DiT s/step | rest s | peak GiB | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['row']} | {r['size']} | {r['steps']} | {r['guidance']} | {r['total_s']:.1f} | "
            f"{r['dit_s_per_step']:.2f} | {r['rest_s (VAE encode+decode, scheduler)']:.1f} | "
            f"{r.get('peak_gib', float('nan')):.1f} | {r.get('target', '-')} |"
        )
    out = os.environ.get("OUT")
    if out:
        Path(out, "validation_video.json").write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
