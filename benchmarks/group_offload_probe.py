"""Does diffusers' group offload work for LoRA training of our DiT? (a small model, on CUDA)

``ModelMixin.enable_group_offload`` keeps each group of blocks in CPU memory and copies it onto the
GPU for its forward (optionally prefetching on a CUDA stream). It is built for inference. This
probe trains a LoRA step on a small LongCat-Video DiT with and without it, with and without
gradient checkpointing, and compares the LoRA gradients with the plain step's; for sampling it
compares one no-grad forward. Prints one line per case: ok with the largest gradient difference
and peak memory, or the error raised.

    python benchmarks/group_offload_probe.py     # needs CUDA
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch

try:
    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel

CONFIG = dict(hidden_size=512, depth=6, num_heads=4, caption_channels=256, adaln_tembed_dim=64)


def build(device: torch.device) -> LongCatVideoTransformer3DModel:
    from peft import LoraConfig

    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(**CONFIG).to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=list(LORA_TARGET_MODULES)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.01)
    return model.to(device)


def inputs(device: torch.device):
    gen = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, 16, 5, 16, 16, generator=gen, device=device, dtype=torch.bfloat16)
    timesteps = torch.full((1, 5), 500.0, device=device)
    timesteps[:, 0] = 0.0
    text = torch.randn(1, 32, CONFIG["caption_channels"], generator=gen, device=device, dtype=torch.bfloat16)
    mask = torch.ones(1, 32, dtype=torch.long, device=device)
    return latents, timesteps, text, mask


def step(model, device, *, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    latents, timesteps, text, mask = inputs(device)
    with torch.set_grad_enabled(train):
        out = model(latents, timesteps, text, mask, num_cond_latents=1, return_dict=False)[0]
        if not train:
            return out.float(), {}
        out[:, :, 1:].float().pow(2).mean().backward()
    grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), grads


def case(name: str, *, checkpointing: bool, offload: str | None, train: bool, reference) -> dict:
    device = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))  # PROBE_DEVICE=cpu: a dry run of the code
    model = build(device)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train(train)
    if offload:
        model.to("cpu")
        model.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type=offload,
            num_blocks_per_group=1 if offload == "block_level" else None,
            use_stream=device.type == "cuda",
        )
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result: dict = {"case": name}
    try:
        out, grads = step(model, device, train=train)
        result["ok"] = True
        if cuda:
            torch.cuda.synchronize()
            result["peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if reference is not None:
            ref_out, ref_grads = reference
            result["max_out_diff"] = float((out - ref_out).abs().max())
            if train:
                missing = sorted(set(ref_grads) - set(grads))
                result["lora_grads"] = f"{len(grads)}/{len(ref_grads)}"
                if missing:
                    result["missing_grads"] = missing[:3]
                common = [n for n in ref_grads if n in grads]
                result["max_grad_diff"] = (
                    max(float((grads[n] - ref_grads[n]).abs().max()) for n in common) if common else None
                )
        result["_value"] = (out, grads)
    except Exception as error:  # the point of the probe: report what breaks
        result["ok"] = False
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        result["where"] = traceback.format_exc().strip().splitlines()[-3][:200]
    del model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> int:
    if not torch.cuda.is_available() and os.environ.get("PROBE_DEVICE") != "cpu":
        print("group_offload_probe: needs CUDA (PROBE_DEVICE=cpu runs the code without offloading anything)")
        return 0
    rows = []
    for train, checkpointing in ((True, True), (True, False), (False, False)):
        label = "train+ckpt" if train and checkpointing else ("train" if train else "sample")
        plain = case(f"{label} plain", checkpointing=checkpointing, offload=None, train=train, reference=None)
        rows.append(plain)
        for offload in ("block_level", "leaf_level"):
            rows.append(
                case(
                    f"{label} {offload}",
                    checkpointing=checkpointing,
                    offload=offload,
                    train=train,
                    reference=plain.get("_value"),
                )
            )
    for row in rows:
        row.pop("_value", None)
        print(json.dumps(row), flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "group_offload_probe.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
