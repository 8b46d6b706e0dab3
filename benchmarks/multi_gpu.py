"""LoRA training on one GPU vs two: data parallel (DDP), sharded (FSDP2), context parallel (CP=2).

Full-size DiT with random bf16 weights, LoRA rank 8, gradient checkpointing, image-to-video
(one clean condition frame). Each mode is its own ``torchrun`` launch; this script runs them in
sequence and prints one table:

    python benchmarks/multi_gpu.py                 # on a 2-GPU machine, full size
    python benchmarks/multi_gpu.py --tiny          # CPU smoke test (gloo), times nothing useful

Modes (``--modes``):
  single-480   1 GPU, 480x832x93, batch 1 (baseline for ddp / fsdp2)
  ddp          2 GPUs, torch DDP over the LoRA weights, batch 1 per GPU
  fsdp2        2 GPUs, fully_shard per transformer block (the model's _no_split_modules) + root,
               frozen DiT sharded, LoRA trained, batch 1 per GPU
  single-720   1 GPU, 704x1280x93 (84,480 tokens), batch 1 (baseline for cp)
  cp2          2 GPUs, one 704x1280x93 sample split by frames, all-to-all over heads, DDP over
               the LoRA weights with the loss scaled by 2 as SimpleTuner does

Scaling efficiency = 2-GPU samples/s / (2 x 1-GPU samples/s): ``t1 / t2`` for ddp and fsdp2
(two samples per step), ``t1 / (2 t2)`` for cp2 (one sample per step). DDP and FSDP2 are what
accelerate sets up under ``simpletuner train``; here they are called directly so the table
measures the model, not the data loader. Every launch sets NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 (NVLink multicast stays off).
With $OUT set, each launch writes $OUT/multi_gpu_<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from dit_step import Shape, Timer  # noqa: E402
from train_step import architecture, build, full_config, make_inputs  # noqa: E402

MODES = {
    "single-480": {"gpus": 1, "size": (480, 832)},
    "ddp": {"gpus": 2, "size": (480, 832), "wrap": "ddp"},
    "fsdp2": {"gpus": 2, "size": (480, 832), "wrap": "fsdp2"},
    "single-720": {"gpus": 1, "size": (704, 1280)},
    "cp2": {"gpus": 2, "size": (704, 1280), "wrap": "ddp", "cp": True},
}
BASELINE = {"ddp": "single-480", "fsdp2": "single-480", "cp2": "single-720"}
NCCL_SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (median reported)")
    p.add_argument("--frames", type=int, default=93)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU with gloo")
    p.add_argument(
        "--offload",
        action="store_true",
        help="every mode with the host's 'unsloth' activation offload (one H100 cannot hold a 720p dense step without it)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def _wrap(model: torch.nn.Module, how: str | None, device: torch.device) -> torch.nn.Module:
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, static_graph=True)
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:  # the model's _no_split_modules unit
            fully_shard(block)
        fully_shard(model)
    return model


def worker(mode: str, args: argparse.Namespace) -> None:
    spec = MODES[mode]
    distributed = spec["gpus"] > 1
    if args.tiny:
        device, dtype = torch.device("cpu"), torch.float32
    else:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device, dtype = torch.device("cuda", local), torch.bfloat16
    if distributed:
        dist.init_process_group("gloo" if args.tiny else "nccl", device_id=None if args.tiny else device)
    rank = dist.get_rank() if distributed else 0
    height, width = spec["size"]
    frames = args.frames
    if args.tiny:
        height, width, frames = (64, 128, 9) if width > 832 else (64, 64, 9)
    shape = Shape(
        batch=1,
        latent_frames=(frames - 1) // 4 + 1,
        latent_height=height // 8,
        latent_width=width // 8,
        num_cond_latents=1,
        text_len=16 if args.tiny else 512,
        text_valid=5 if args.tiny else 100,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = build("ours", full_config(args.tiny), {"offload": args.offload}, device, dtype, args.lora_rank)
    if spec.get("cp"):
        model.enable_context_parallel(dist.group.WORLD)
    wrapped = _wrap(model, spec.get("wrap"), device)
    latents, target, timesteps, text, mask = make_inputs(shape, architecture(args.tiny), device, dtype)
    if distributed and not spec.get("cp"):
        # Data parallel: a different sample per rank.
        latents, target = latents + rank, target - rank
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    loss_scale = dist.get_world_size() if spec.get("cp") else 1

    def step() -> float:
        out = wrapped(latents, timesteps, text, mask, num_cond_latents=1, return_dict=False)[0]
        loss = F.mse_loss(out[:, :, 1:].float(), target[:, :, 1:])
        (loss * loss_scale).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    first = step()
    times = []
    for _ in range(args.steps):
        if distributed:
            dist.barrier()
        with Timer(device) as timer:
            loss = step()
        times.append(timer.seconds)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    result = {
        "mode": mode,
        "gpus": spec["gpus"],
        "size": f"{height}x{width}x{frames}",
        "tokens": shape.latent_frames * (shape.latent_height // 2) * (shape.latent_width // 2),
        "step_s": statistics.median(times),
        "step_times_s": times,
        "loss_first": first,
        "loss": loss,
        "peak_gib": peak,
    }
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        result["step_s"] = max(r["step_s"] for r in gathered)  # the step ends when the slowest rank does
        result["peak_gib"] = max((r["peak_gib"] or 0) for r in gathered) or None
        result["loss_per_rank"] = [r["loss"] for r in gathered]
        dist.destroy_process_group()
    if rank == 0:
        out_dir = Path(os.environ.get("OUT") or "/tmp")
        (out_dir / f"multi_gpu_{mode}.json").write_text(json.dumps(result, indent=2))
        print("RESULT " + json.dumps(result), flush=True)


def launch(mode: str, args: argparse.Namespace) -> dict:
    spec = MODES[mode]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(spec["gpus"])]
    command += [
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--steps",
        str(args.steps),
        "--frames",
        str(args.frames),
    ]
    command += ["--lora-rank", str(args.lora_rank)] + (["--tiny"] if args.tiny else [])
    command += ["--offload"] if args.offload else []
    env = {**os.environ, **NCCL_SAFE_ENV}
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd="/tmp")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = (proc.stdout + proc.stderr)[-3000:]
        print(f"[multi_gpu] {mode} failed (exit {proc.returncode}):\n{tail}", flush=True)
        return {
            "mode": mode,
            "gpus": spec["gpus"],
            "error": ([line for line in tail.splitlines() if "Error" in line] or ["no result"])[-1][:200],
        }
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["launch_s"] = time.perf_counter() - started
    print(json.dumps(result), flush=True)
    return result


def efficiency(mode: str, results: dict[str, dict]) -> float | None:
    base = results.get(BASELINE.get(mode, ""), {}).get("step_s")
    step = results.get(mode, {}).get("step_s")
    if base is None or step is None:
        return None
    return base / (2 * step) if MODES[mode].get("cp") else base / step


def main() -> None:
    args = parse_args()
    if args.worker:
        worker(args.worker, args)
        return
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    if not args.tiny and torch.cuda.device_count() < max(MODES[m]["gpus"] for m in modes):
        raise SystemExit(f"needs {max(MODES[m]['gpus'] for m in modes)} GPUs, found {torch.cuda.device_count()}")
    meta = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu (gloo)",
        "gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    print(json.dumps(meta), flush=True)
    results = {mode: launch(mode, args) for mode in modes}
    print("\n| mode | GPUs | size | tokens | s/step | samples/s | peak GiB/GPU | scaling eff. | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        per_step = 1 if MODES[mode].get("cp") or MODES[mode]["gpus"] == 1 else MODES[mode]["gpus"]
        eff = efficiency(mode, results)
        step = r.get("step_s")
        print(
            f"| {mode} | {r['gpus']} | {r.get('size', '')} | {r.get('tokens', '')} | "
            f"{'n/a' if step is None else f'{step:.2f}'} | {'n/a' if step is None else f'{per_step / step:.3f}'} | "
            f"{'n/a' if r.get('peak_gib') is None else f'{r["peak_gib"]:.1f}'} | "
            f"{'' if eff is None else f'{eff:.0%}'} | {r.get('error', '')} |"
        )


if __name__ == "__main__":
    main()
