"""Continue a video with LongCat-Video, optionally into a long video of several segments.

    python -m simpletuner_longcat_video.core.continue_video --checkpoint DIR --video in.mp4 \\
        --prompt "..." --condition-frames 13 --segments 3 --out out.mp4 [--lora lora.safetensors]

Segment 1 continues the video from its first ``--condition-frames`` frames (``--from-end``: from
its last ones, as upstream's ``run_demo_video_continuation.py`` does); every later segment continues
the last frames of the one before (:meth:`LongCatVideoPipeline.generate_long`). The mp4 holds every
generated frame: segment 1 whole, then each later segment without the frames it shares.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

import torch

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.pipeline import check_condition, load_pipeline, video_frames

logger = logging.getLogger("simpletuner_longcat_video.core.continue_video")

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m simpletuner_longcat_video.core.continue_video", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--checkpoint", required=True, help="LongCat-Video folder in the official layout (dit/, vae/, ...)")
    p.add_argument("--video", required=True, help="the video file to continue")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--out", required=True, help="the mp4 to write")
    p.add_argument("--condition-frames", type=int, default=spec.DEFAULT_CONDITION_FRAMES, help="4k+1 (default 13)")
    p.add_argument("--segments", type=int, default=1, help="continuations chained (default 1)")
    p.add_argument("--from-end", action="store_true", help="condition on the video's last frames, not its first")
    p.add_argument("--lora", default=None, help="a LoRA file to apply to the DiT (this plugin's or diffusers' format)")
    p.add_argument("--frames", type=int, default=spec.DEFAULT_NUM_FRAMES, help="frames per segment (default 93)")
    p.add_argument("--height", type=int, default=None, help="default: the video's height, to a multiple of 16")
    p.add_argument("--width", type=int, default=None, help="default: the video's width, to a multiple of 16")
    p.add_argument("--steps", type=int, default=spec.DEFAULT_STEPS)
    p.add_argument("--guidance", type=float, default=spec.DEFAULT_GUIDANCE)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--fps", type=int, default=15, help="frame rate of the mp4 (upstream's 15)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the condition frames at every step")
    return p.parse_args(argv)


def _snapped(value: int) -> int:
    return max(spec.SIZE_MULTIPLE, round(value / spec.SIZE_MULTIPLE) * spec.SIZE_MULTIPLE)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # Everything that can be refused is refused before the model loads.
    if args.from_end:
        count = spec.check_condition_frames(args.condition_frames, args.frames, "--condition-frames")
        condition = video_frames(args.video)[-count:]
        condition, count = check_condition(None, condition, count, args.frames)
    else:
        condition, count = check_condition(None, args.video, args.condition_frames, args.frames)
    width, height = condition[0].size
    height, width = args.height or _snapped(height), args.width or _snapped(width)

    started = time.perf_counter()
    pipe = load_pipeline(args.checkpoint, torch_dtype=dtype)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    pipe.to(device)
    generator = torch.Generator().manual_seed(args.seed)
    out = pipe.generate_long(
        args.prompt,
        condition,
        num_condition_frames=count,
        num_segments=args.segments,
        negative_prompt=args.negative_prompt,
        height=height,
        width=width,
        num_frames=args.frames,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=generator,
        use_kv_cache=not args.no_kv_cache,
        output_path=args.out,
        fps=args.fps,
    )
    print(
        f"wrote {args.out}: {len(out.frames)} frames at {width}x{height}, {args.segments} segment(s) of "
        f"{args.frames} frames from {count} condition frames, {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
