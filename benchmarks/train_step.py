"""Full-size LoRA training step, side by side: this plugin's DiT vs SimpleTuner's built-in LongCat-Video DiT.

Both models get the same random bf16 weights recipe, the same inputs (image-to-video, one clean
condition latent frame, per-frame timesteps), LoRA rank 8 on the same projections, gradient
checkpointing, and the host's own memory mechanisms (Musubi block swap, the host quantiser for
int8-quanto / fp8-torchao, the host's "unsloth" activation offload). Each row runs one warm-up
step and reports the median of the timed steps.

    python benchmarks/train_step.py --rows plain,swap8            # GPU, full size
    python benchmarks/train_step.py --tiny --rows all             # CPU smoke test of every row

Rows (ours and the built-in unless marked):
  plain          480x832x93 I2V, bf16, dense attention (PyTorch SDPA)
  plain-compiled ours only: plain with every block torch.compile'd (compile_blocks)
  int8-quanto-compiled  ours only: int8-quanto with compiled blocks
  bsa            ours only: plain with block-sparse attention 0.875 (the default on CUDA)
  bsa-compiled   ours only: bsa with compiled blocks (the kernels are custom ops Inductor calls as is)
  bsa-compiled-saves-attention  ours only: bsa-compiled, each checkpointed block keeping its attention
                 output and log-sum-exp (longcat_checkpoint_saves: attention, what auto picks)
  bsa-compiled-saves-proj       ours only: the same with attention+proj (also the hidden-wide projection outputs)
  bsa-compiled-saves-ffn        ours only: the same with attention+ffn (also the FFN matmul outputs)
  bsa-saves-attention           ours only: bsa (eager blocks) with longcat_checkpoint_saves: attention
  plain-compiled-saves-attention  ours only: plain-compiled (dense SDPA) with longcat_checkpoint_saves: attention
  bsa-compiled-k13  ours only: bsa-compiled as video continuation from 13 frames (4 condition latents)
  swap8          plain + musubi_blocks_to_swap=8 (blocks 40-47 streamed from CPU memory)
  int8-quanto    plain with the frozen DiT quantised by the host (optimum-quanto int8 weights)
  fp8-torchao    plain with the frozen DiT quantised by the host (torchao fp8 weights + activations)
  bsa-i2v        ours only: 704x1280x93 I2V, block-sparse attention 0.875, unsloth activation offload
  bsa-t2v        704x1280x93 text-to-video (no condition frame), block-sparse 0.875, unsloth offload
                 (the built-in's kernel needs every latent frame count divisible by 4: 24 frames)

FLOPs: dit_step.count_flops (written out there), dense attention counted also for block-sparse
rows (a dense-equivalent figure, marked); MFU against 989 TFLOP/s dense bf16 (the H100/H200 spec)
and against --ceiling-tflops (the matmul ceiling measured on the H200: 670).
Results: a markdown table on stdout and, with $OUT set, $OUT/train_step.json (rewritten after
every row, so a cut-off run keeps what it measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import torch
import torch._dynamo
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dit_step import H100_BF16_DENSE_TFLOPS, TINY_CONFIG, Shape, Timer, count_flops  # noqa: E402

try:
    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel
except ImportError:  # running from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel
# Block swap and the "unsloth" checkpoint run through SimpleTuner's own code, which the family hands the DiT.
import simpletuner_longcat_video.host.family  # noqa: E402, F401
from simpletuner_longcat_video import spec  # noqa: E402

ROWS: dict[str, dict] = {
    "plain": {},
    "plain-compiled": {"ours_only": True, "compile": True},
    "int8-quanto-compiled": {"ours_only": True, "precision": "int8-quanto", "compile": True},
    "bsa": {"ours_only": True, "bsa": True},
    "bsa-compiled": {"ours_only": True, "bsa": True, "compile": True},
    "bsa-compiled-saves-attention": {"ours_only": True, "bsa": True, "compile": True, "saves": "attention"},
    "bsa-compiled-saves-proj": {"ours_only": True, "bsa": True, "compile": True, "saves": "attention+proj"},
    "bsa-compiled-saves-ffn": {"ours_only": True, "bsa": True, "compile": True, "saves": "attention+ffn"},
    "bsa-saves-attention": {"ours_only": True, "bsa": True, "saves": "attention"},
    "plain-compiled-saves-attention": {"ours_only": True, "compile": True, "saves": "attention"},
    "bsa-compiled-k13": {"ours_only": True, "bsa": True, "compile": True, "cond": 4},
    "swap8": {"swap": 8},
    "int8-quanto": {"precision": "int8-quanto"},
    "fp8-torchao": {"precision": "fp8-torchao"},
    "bsa-i2v": {"ours_only": True, "bsa": True, "size": (704, 1280), "offload": True},
    "bsa-t2v": {"bsa": True, "size": (704, 1280), "offload": True, "cond": 0},
}
BSA = {"sparsity": 0.875, "chunk": (4, 4, 8)}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="plain,swap8", help=f"comma list of {list(ROWS)} or 'all'")
    p.add_argument("--models", default="ours,builtin", help="comma list of ours,builtin")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (median reported)")
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (checks every code path, times nothing)")
    p.add_argument("--profile", default="", help="comma list of rows: after ours/<row>, profile one step")
    p.add_argument(
        "--autocast",
        action="store_true",
        help="run the forward under bf16 autocast, as the host's accelerate mixed precision does",
    )
    p.add_argument("--ceiling-tflops", type=float, default=670.0, help="measured bf16 matmul ceiling")
    return p.parse_args()


def _init_random(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    # 13.6B parameters through the normal initialisers take minutes; allocate once on the device
    # and fill with cheap random values (only speed and memory are measured).
    torch.nn.Module.to(model, dtype)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm_final.weight"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()), generator=gen)
            else:
                p.zero_()
        for b in model.buffers():
            if b.is_floating_point():
                b.zero_()


def build(which: str, config: dict, row: dict, device: torch.device, dtype: torch.dtype, rank: int):
    extra = {}
    if which == "builtin":
        from simpletuner.helpers.models.longcat_video.transformer import (
            LongCatVideoTransformer3DModel as BuiltIn,
        )

        cls = BuiltIn
        if row.get("bsa"):
            extra = dict(
                enable_bsa=True,
                bsa_params={
                    "sparsity": BSA["sparsity"],
                    "chunk_3d_shape_q": list(BSA["chunk"]),
                    "chunk_3d_shape_k": list(BSA["chunk"]),
                },
            )
        if row.get("swap"):
            extra["musubi_blocks_to_swap"] = row["swap"]
    else:
        cls = LongCatVideoTransformer3DModel
    with torch.device("meta"):
        model = cls(**config, **extra)
    _init_random(model, device, dtype)
    model.requires_grad_(False)
    if which == "ours":
        # The block-sparse kernels are Triton GPU code: the CPU smoke test runs these rows dense.
        model.set_attention_options(
            backend="block_sparse" if row.get("bsa") and device.type == "cuda" else "sdpa",
            sparsity=BSA["sparsity"],
            chunk=BSA["chunk"],
        )
    if row.get("precision"):
        model = host_quantise(model, row["precision"])
    from peft import LoraConfig

    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGET_MODULES)))
    gen = torch.Generator(device=device).manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # nonzero B: the adapter path carries real gradients
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * 1e-3)
    model.enable_gradient_checkpointing()
    if row.get("saves"):
        model.set_checkpoint_saves(row["saves"])
    if row.get("compile"):
        model.compile_blocks()
    if row.get("offload"):
        model.set_gradient_checkpointing_backend("unsloth")
        if which == "builtin":
            from simpletuner.helpers.training.gradient_checkpointing_interval import set_checkpoint_backend

            set_checkpoint_backend("unsloth")
    if row.get("swap"):
        if which == "ours":
            model.enable_block_swap(row["swap"], "cpu")
        # What the host's trainer does for block swap (_move_model_with_block_swap): resident
        # blocks stay on the GPU, swapped ones go to CPU memory, LoRA weights stay on the GPU.
        model._musubi_block_swap.mark_blocks_for_offload(list(model.blocks))
    model.train()
    return model


def host_quantise(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The host's quantiser, called as its trainer calls it for the base model."""
    from simpletuner.helpers.training.quantisation import quantise_model
    from simpletuner.helpers.training.state_tracker import StateTracker

    args = SimpleNamespace(
        model_family="longcat_video",
        base_model_precision=precision,
        quantize_activations=False,
        **{f"text_encoder_{i}_precision": "no_change" for i in range(1, 5)},
    )
    StateTracker.set_args(args)
    return quantise_model(model=model, args=args, return_dict=True)["model"] or model


def make_inputs(shape: Shape, config: dict, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device=device).manual_seed(1)
    b, t, h, w = shape.batch, shape.latent_frames, shape.latent_height, shape.latent_width
    cin, ccap = config.get("in_channels", 16), config.get("caption_channels", 4096)
    latents = torch.randn(b, cin, t, h, w, generator=gen, device=device, dtype=dtype)
    target = torch.randn(b, cin, t, h, w, generator=gen, device=device, dtype=torch.float32)
    timesteps = torch.full((b, t), 500.0, device=device)
    timesteps[:, : shape.num_cond_latents] = 0.0
    text = torch.randn(b, shape.text_len, ccap, generator=gen, device=device, dtype=dtype)
    mask = torch.zeros(b, shape.text_len, dtype=torch.long, device=device)
    mask[:, : shape.text_valid] = 1
    return latents, target, timesteps, text, mask


def train_step(model, latents, target, timesteps, text, mask, ncl: int, autocast: bool = False) -> float:
    with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = model(latents, timesteps, text, mask, num_cond_latents=ncl, return_dict=False)[0]
    loss = F.mse_loss(out[:, :, ncl:].float(), target[:, :, ncl:])
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return float(loss.detach())


# Deep enough for the swap8 row; everything else as dit_step's tiny model.
TINY = {**TINY_CONFIG, "depth": 10}


def full_config(tiny: bool) -> dict:
    config = dict(TINY) if tiny else {}
    config["text_tokens_zero_pad"] = True  # the official dit/config.json
    return config


def architecture(tiny: bool) -> dict:
    # count_flops needs the architecture numbers; both models share the official ones.
    official = spec.OFFICIAL_DIT_CONFIG
    cfg = {key: value for key, value in official.items() if type(value) is int}  # the numbers, no switches
    if tiny:
        cfg.update(TINY)
    return cfg


def run_row(name: str, which: str, args: argparse.Namespace, device, dtype) -> dict:
    row = ROWS[name]
    height, width = row.get("size", (480, 832))
    frames = args.frames
    if args.tiny:
        height, width, frames = (64, 128, 9) if row.get("size") else (64, 64, 9)
    ncl = row.get("cond", 1)
    shape = Shape(
        batch=1,
        latent_frames=(frames - 1) // 4 + 1,
        latent_height=height // 8,
        latent_width=width // 8,
        num_cond_latents=ncl,
        text_len=16 if args.tiny else 512,
        text_valid=5 if args.tiny else 100,
    )
    result: dict = {"row": name, "model": which, "size": f"{height}x{width}x{frames}", "cond_frames": ncl}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if row.get("compile"):
        # Each compiled row compiles from scratch: its first step is its own compile time, and rows with
        # other checkpoint levels or backends do not fill Dynamo's per-function recompile limit (8).
        torch._dynamo.reset()
    t0 = time.perf_counter()
    model = build(which, full_config(args.tiny), row, device, dtype, args.lora_rank)
    result["build_s"] = time.perf_counter() - t0
    if which == "ours":
        result["checkpoint_saves"] = model.checkpoint_saves
    inputs = make_inputs(shape, architecture(args.tiny), device, dtype)
    try:
        with Timer(device) as timer:
            result["loss_first"] = train_step(model, *inputs, ncl, args.autocast)  # warm-up (compiles, autotunes)
        result["first_step_s"] = timer.seconds
        times, loss = [], None
        for _ in range(args.steps):
            with Timer(device) as timer:
                loss = train_step(model, *inputs, ncl, args.autocast)
            times.append(timer.seconds)
        result["step_times_s"] = times
        result["step_s"] = statistics.median(times)
        result["loss"] = loss
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        flops = count_flops(architecture(args.tiny), shape, args.lora_rank, True, checkpointing=True)
        result["model_tflop"] = flops["model"] / 1e12
        result["tflops"] = flops["model"] / result["step_s"] / 1e12
        result["mfu"] = result["tflops"] / H100_BF16_DENSE_TFLOPS
        result["mfu_ceiling"] = result["tflops"] / args.ceiling_tflops
        result["flops_note"] = "dense-equivalent" if row.get("bsa") else "dense"
        if which == "ours" and name in args.profile.split(","):
            result["profile"] = profile_step(model, inputs, ncl, device, args.autocast)
        if which == "builtin" and row.get("bsa"):
            failed = any(getattr(b.attn, "_bsa_attention_failed", False) for b in model.blocks)
            loaded = any(getattr(b.attn, "_bsa_attention", None) is not None for b in model.blocks)
            result["builtin_bsa"] = "fell back to dense" if failed else ("ran" if loaded else "not available")
    except torch.OutOfMemoryError as exc:
        result["error"] = f"out of memory: {str(exc).splitlines()[0]}"
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


KERNEL_GROUPS = (
    ("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "sm90", "splitk")),
)


def profile_step(model, inputs, ncl: int, device: torch.device, autocast: bool) -> dict:
    """One step under the torch profiler: GPU time by kernel group and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        train_step(model, *inputs, ncl, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    groups: dict[str, float] = {}
    for e in events:
        lowered = e.key.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k in lowered for k in keys)), "other")
        groups[group] = groups.get(group, 0.0) + getattr(e, attr) / 1e6
    top = sorted(events, key=lambda e: getattr(e, attr), reverse=True)[:25]
    summary = {
        "seconds_by_group": groups,
        "top": [(e.key[:110], getattr(e, attr) / 1e6, e.count) for e in top],
    }
    print("\nprofile (one step, GPU seconds by group):", json.dumps(groups))
    for key, seconds, count in summary["top"]:
        print(f"  {seconds:8.3f} s  x{count:<6d} {key}")
    return summary


def print_table(results: list[dict]) -> None:
    print("\n| row | model | size | first step s | s/step | peak GiB | TFLOP/s | MFU spec / ceiling | loss | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def f(r: dict, key: str, spec: str) -> str:
        return format(r[key], spec) if r.get(key) is not None else "n/a"

    for r in results:
        note = r.get("error") or r.get("builtin_bsa") or ""
        if r.get("flops_note") == "dense-equivalent":
            note = f"{note} FLOPs dense-equivalent".strip()
        print(
            f"| {r['row']} | {r['model']} | {r['size']} | {f(r, 'first_step_s', '.1f')} | {f(r, 'step_s', '.2f')} | "
            f"{f(r, 'peak_gib', '.1f')} | {f(r, 'tflops', '.0f')} | {f(r, 'mfu', '.1%')} / {f(r, 'mfu_ceiling', '.1%')} | "
            f"{f(r, 'loss', '.4f')} | {note} |"
        )


def main() -> None:
    args = parse_args()
    names = list(ROWS) if args.rows == "all" else args.rows.split(",")
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    models = args.models.split(",")
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
        args.steps = min(args.steps, 2)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full-size benchmark needs a CUDA GPU; use --tiny for a CPU smoke test")
        device, dtype = torch.device("cuda"), torch.bfloat16
    meta = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta))
    results: list[dict] = []
    out = Path(os.environ["OUT"]) / "train_step.json" if os.environ.get("OUT") else None
    for name in names:
        for which in models:
            if which == "builtin" and ROWS[name].get("ours_only"):
                continue
            if ROWS[name].get("precision") == "fp8-torchao" and device.type != "cuda":
                continue  # torchao's fp8 matmuls need an sm89+ GPU
            print(f"[train_step] {name} / {which} ...", flush=True)
            try:
                result = run_row(name, which, args, device, dtype)
            except Exception as exc:  # one broken row must not lose the others
                traceback.print_exc()
                result = {"row": name, "model": which, "size": "", "error": f"{type(exc).__name__}: {exc}"[:300]}
            results.append(result)
            print(json.dumps(result), flush=True)
            if out is not None:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
