"""One LoRA training step of the full-size LongCat-Video DiT: time, memory, FLOPs, MFU.

The setting is the plugin's main job: image-to-video at 480x832, 93 frames (latent
[1, 16, 24, 60, 104], one condition latent frame), a 512-token prompt with ~100 real tokens,
frozen bf16 base weights (random: only speed and memory are measured), LoRA rank 8 on the
attention and FFN projections, gradient checkpointing, dense SDPA attention.

    python benchmarks/dit_step.py                 # GPU, full size, median of 5 steps
    python benchmarks/dit_step.py --tiny          # CPU, tiny config, seconds (smoke test)

Prints a markdown table; with $OUT set, also writes $OUT/dit_step.json.

FLOPs are counted analytically (see ``count_flops``), with the usual conventions: a matmul of
[m, k] x [k, n] costs 2*m*k*n; the frozen base layers need only activation gradients in the
backward (1x forward), LoRA layers need activation and weight gradients (2x forward),
attention backward costs 2x its forward. "Model" FLOPs (for MFU) exclude the forward that
gradient checkpointing recomputes; "hardware" FLOPs include it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel

H100_BF16_DENSE_TFLOPS = 989.0  # H100 SXM dense bf16 peak

FULL_CONFIG: dict = {}  # the constructor defaults are the official architecture
TINY_CONFIG = dict(
    hidden_size=64,
    depth=2,
    num_heads=4,
    caption_channels=32,
    adaln_tembed_dim=32,
    frequency_embedding_size=32,
)


@dataclasses.dataclass
class Shape:
    batch: int
    latent_frames: int
    latent_height: int
    latent_width: int
    num_cond_latents: int
    text_len: int
    text_valid: int


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test of this script)")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (median reported)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--num-cond-latents", type=int, default=1)
    p.add_argument("--text-len", type=int, default=512)
    p.add_argument("--text-valid", type=int, default=100)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--backend", default="sdpa", help="attention backend (sdpa, xformers, block_sparse, auto)")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument(
        "--text-zero-pad",
        choices=("on", "off"),
        default="on",
        help="on: padded text tokens are zeroed and attended (the official config); off: masked out and dropped",
    )
    return p.parse_args()


def shape_from_args(args: argparse.Namespace) -> Shape:
    if (args.frames - 1) % 4:
        raise SystemExit(f"--frames {args.frames}: the Wan VAE needs (frames - 1) % 4 == 0")
    if args.height % 16 or args.width % 16:
        raise SystemExit(f"--height/--width {args.height}x{args.width}: must be multiples of 16")
    return Shape(
        batch=1,
        latent_frames=(args.frames - 1) // 4 + 1,
        latent_height=args.height // 8,
        latent_width=args.width // 8,
        num_cond_latents=args.num_cond_latents,
        text_len=args.text_len,
        text_valid=args.text_valid,
    )


def build_model(
    config: dict, device: torch.device, dtype: torch.dtype, lora_rank: int
) -> LongCatVideoTransformer3DModel:
    # Materialising 13.6B parameters through the normal initialisers takes minutes on one
    # core; build on meta, allocate once, and fill with cheap random values instead.
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**config)
    torch.nn.Module.to(model, dtype)  # ModelMixin.to would warn about the fp32 modules we restore next
    keep = tuple(model._keep_in_fp32_modules or ())
    for name, module in model.named_modules():
        if keep and any(part in keep for part in name.split(".")):
            module.float()
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            else:
                p.zero_()
    model.requires_grad_(False)
    if not lora_rank:  # the plain model (benchmarks/sampling_step.py samples without an adapter)
        return model

    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=list(LORA_TARGET_MODULES)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero B so the adapter path carries real gradients
                p.normal_(0.0, 1e-3, generator=gen)
    return model


def make_inputs(shape: Shape, in_channels: int, caption_channels: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    b, t, h, w = shape.batch, shape.latent_frames, shape.latent_height, shape.latent_width
    latents = torch.randn(b, in_channels, t, h, w, generator=gen, device=device, dtype=dtype)
    target = torch.randn(b, in_channels, t, h, w, generator=gen, device=device, dtype=torch.float32)
    timesteps = torch.full((b, t), 500.0, device=device)
    timesteps[:, : shape.num_cond_latents] = 0.0  # the condition frame is clean
    text = torch.randn(b, 1, shape.text_len, caption_channels, generator=gen, device=device, dtype=dtype)
    mask = torch.zeros(b, shape.text_len, dtype=torch.long, device=device)
    mask[:, : shape.text_valid] = 1
    return latents, target, timesteps, text, mask


def count_flops(cfg: dict, shape: Shape, lora_rank: int, zero_pad: bool, checkpointing: bool) -> dict[str, float]:
    """Analytic FLOPs of one forward+backward of the LoRA step.

    Per block, with N tokens (Nc condition, Nn = N - Nc noisy), width C, FFN inner F, L text
    tokens (all padded slots when zero-padding, else the valid ones), T latent frames:
      adaLN      2*T*Ct*6C
      qkv        2*N*C*3C            attention proj   2*N*C*C
      self-attn  4*Nc*Nc*C (condition queries see condition keys)
               + 4*Nn*N*C  (noisy queries see all keys)      [QK^T and PV, 2*Sq*Sk*D each, all heads]
      cross q    2*Nn*C*C            cross kv         2*L*C*2C        cross proj  2*Nn*C*C
      cross-attn 4*Nn*L*C  (condition tokens skip cross-attention)
      SwiGLU     3 * 2*N*C*F
      LoRA       2*m*r*(in + out) for each adapted linear over its m tokens
    Outside the blocks: patch embed 2*N*(Cin*4)*C, caption MLP 2*L*(Ccap*C + C*C), timestep MLP
    2*T*(Cf*Ct + Ct*Ct), final layer 2*N*C*(4*Cout) + 2*T*Ct*2C.

    Backward: a frozen linear costs 1x its forward (input gradient only), a LoRA pair 2x (input
    and weight gradients), attention 2x. Layers whose input needs no gradient skip the input
    gradient: every adaLN (fed by the frozen timestep MLP), the text kv projection (fed by the
    frozen caption MLP) and block 0's qkv (fed by the frozen patch embedding); the embedders need
    no backward at all. Recompute (gradient checkpointing): the block forward once more.
    """
    b = shape.batch
    c = cfg["hidden_size"]
    depth = cfg["depth"]
    ct = cfg["adaln_tembed_dim"]
    cin, cout, ccap = cfg["in_channels"], cfg["out_channels"], cfg["caption_channels"]
    inner = int(2 * c * cfg["mlp_ratio"] / 3)
    inner = 256 * ((inner + 255) // 256)
    t = shape.latent_frames
    per_frame = (shape.latent_height // 2) * (shape.latent_width // 2)
    n = t * per_frame
    nc = shape.num_cond_latents * per_frame
    nn_ = n - nc
    text = shape.text_len if zero_pad else shape.text_valid
    r = lora_rank

    # (forward FLOPs, does its input need a gradient) per frozen linear of one block.
    adaln = 2 * t * ct * 6 * c
    qkv = 2 * n * c * 3 * c
    kv = 2 * text * c * 2 * c
    rest = 2 * n * c * c + 2 * nn_ * c * c + 2 * nn_ * c * c + 3 * 2 * n * c * inner  # proj, cross q, cross proj, FFN
    lora_qkv = 2 * n * r * (c + 3 * c)
    lora_kv = 2 * text * r * (c + 2 * c)
    lora_rest = (
        2 * n * r * (c + c)  # attn.proj
        + 2 * nn_ * r * (c + c)  # cross q_linear
        + 2 * nn_ * r * (c + c)  # cross proj
        + 2 * 2 * n * r * (c + inner)  # w1, w3
        + 2 * n * r * (inner + c)  # w2
    )
    attn = 4 * nc * nc * c + 4 * nn_ * n * c + 4 * nn_ * text * c

    block_fwd = adaln + qkv + kv + rest + lora_qkv + lora_kv + lora_rest + attn
    block_bwd = (
        qkv
        + rest  # input gradients of the frozen linears that need them
        + 2 * (lora_qkv + lora_rest)
        + 2 * lora_kv
        - 2 * text * r * c  # kv LoRA: no gradient for its (frozen) input
        + 2 * attn
    )
    block0_saving = qkv + 2 * n * r * c  # block 0: qkv and its LoRA-A need no input gradient
    final = 2 * n * c * 4 * cout
    temb = 2 * t * (cfg["frequency_embedding_size"] * ct + ct * ct)
    outside_fwd = 2 * n * cin * 4 * c + 2 * text * (ccap * c + c * c) + temb + final + 2 * t * ct * 2 * c

    forward = b * (depth * block_fwd + outside_fwd)
    backward = b * (depth * block_bwd - block0_saving + final)
    recompute = b * depth * block_fwd if checkpointing else 0
    attention = b * depth * attn * (3 + (1 if checkpointing else 0))
    model = forward + backward
    hardware = model + recompute
    return {
        "forward": forward,
        "backward": backward,
        "recompute": recompute,
        "model": model,
        "hardware": hardware,
        "attention_share": b * depth * attn * 3 / model,
        "matmul_hardware_no_attention": hardware - attention,
    }


class Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.t0


def train_step(model, latents, target, timesteps, text, mask, ncl: int) -> float:
    out = model(latents, timesteps, text, mask, num_cond_latents=ncl, return_dict=False)[0]
    loss = F.mse_loss(out[:, :, ncl:], target[:, :, ncl:])  # no loss on the condition frame
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return float(loss.detach())


def measured_matmul_flops(model, inputs, ncl: int) -> float:
    """Matmul/conv FLOPs of one step as torch counts them (attention kernels excluded)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, *inputs, ncl)
    counts = counter.get_flop_counts().get("Global", {})
    skip = ("attention", "sdpa")
    return float(sum(v for op, v in counts.items() if not any(s in str(op) for s in skip)))


def device_and_config(args: argparse.Namespace, tiny_frames: int) -> tuple[torch.device, torch.dtype, dict]:
    """``--tiny``: CPU, float32, the tiny config, and small sizes written into ``args``; else CUDA and the full DiT."""
    if args.tiny:
        args.height, args.width, args.frames = 64, 64, tiny_frames
        args.text_len, args.text_valid = 16, 5
        args.steps = min(args.steps, 2)
        return torch.device("cpu"), torch.float32, dict(TINY_CONFIG)
    if not torch.cuda.is_available():
        raise SystemExit("the full-size benchmark needs a CUDA GPU; use --tiny for a CPU smoke test")
    return torch.device("cuda"), torch.bfloat16, dict(FULL_CONFIG)


def main() -> None:
    args = parse_args()
    device, dtype, config = device_and_config(args, tiny_frames=9)
    zero_pad = args.text_zero_pad == "on"
    config["text_tokens_zero_pad"] = zero_pad
    shape = shape_from_args(args)

    t0 = time.perf_counter()
    model = build_model(config, device, dtype, args.lora_rank)
    build_s = time.perf_counter() - t0
    model.set_attention_options(backend=args.backend)
    if not args.no_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    cfg = dict(model.config)
    inputs = make_inputs(shape, cfg["in_channels"], cfg["caption_channels"], device, dtype)
    ncl = shape.num_cond_latents

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_step(model, *inputs, ncl)  # warm-up: kernels, autotuning, allocator
    times = []
    for _ in range(args.steps):
        with Timer(device) as timer:
            loss = train_step(model, *inputs, ncl)
        times.append(timer.seconds)
    step_s = statistics.median(times)
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None

    flops = count_flops(cfg, shape, args.lora_rank, zero_pad, checkpointing=not args.no_checkpointing)
    hardware = flops["hardware"]
    tflops = flops["model"] / step_s / 1e12
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "dtype": str(dtype).removeprefix("torch."),
        "latent_shape": [shape.batch, cfg["in_channels"], shape.latent_frames, shape.latent_height, shape.latent_width],
        "tokens": shape.latent_frames * (shape.latent_height // 2) * (shape.latent_width // 2),
        "num_cond_latents": ncl,
        "text_tokens": shape.text_len,
        "text_valid": shape.text_valid,
        "text_zero_pad": zero_pad,
        "lora_rank": args.lora_rank,
        "gradient_checkpointing": not args.no_checkpointing,
        "attention_backend": args.backend,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "build_s": build_s,
        "step_times_s": times,
        "step_s": step_s,
        "loss": loss,
        "peak_memory_gib": peak_gib,
        "model_tflop_per_step": flops["model"] / 1e12,
        "hardware_tflop_per_step": hardware / 1e12,
        "attention_flop_share": flops["attention_share"],
        "achieved_tflops": tflops,
        "mfu": tflops / H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None,
        "hfu": hardware / step_s / 1e12 / H100_BF16_DENSE_TFLOPS if device.type == "cuda" else None,
    }
    if args.tiny:
        # Self-check of the formula: torch's own count of the matmuls (attention excluded).
        measured = measured_matmul_flops(model, inputs, ncl)
        result["matmul_flops_measured"] = measured
        result["matmul_flops_analytic"] = flops["matmul_hardware_no_attention"]

    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    rows = [
        ("device", result["device"]),
        ("latent", "x".join(map(str, result["latent_shape"])) + f" ({result['tokens']} tokens, {ncl} cond frame)"),
        ("text", f"{shape.text_len} tokens, {shape.text_valid} valid, zero-pad {'on' if zero_pad else 'off'}"),
        ("LoRA / checkpointing / attention", f"rank {args.lora_rank} / {not args.no_checkpointing} / {args.backend}"),
        (f"s/step (median of {args.steps})", fmt(step_s, ".3f")),
        ("peak GPU memory (GiB)", fmt(peak_gib, ".1f")),
        ("model TFLOP/step (hardware)", f"{flops['model'] / 1e12:.1f} ({hardware / 1e12:.1f})"),
        ("attention share of FLOPs", f"{flops['attention_share']:.1%}"),
        ("achieved TFLOP/s", fmt(tflops, ".1f")),
        ("MFU vs 989 TFLOP/s (HFU)", f"{fmt(result['mfu'], '.1%')} ({fmt(result['hfu'], '.1%')})"),
    ]
    if args.tiny:
        ratio = result["matmul_flops_measured"] / result["matmul_flops_analytic"]
        rows.append(("matmul FLOPs measured / analytic", f"{ratio:.3f}"))
    print("\n| LongCat-Video DiT LoRA step | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")

    write_result("dit_step.json", result)


def write_result(name: str, result: dict) -> None:
    """``result`` as ``$OUT/<name>`` when ``$OUT`` is set (the device machine hands that folder back)."""
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = Path(out_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
