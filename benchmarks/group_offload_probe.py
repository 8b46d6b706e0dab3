"""Does diffusers' group offload work for LoRA training of our DiT? (a small model, on CUDA)

``ModelMixin.enable_group_offload`` keeps each group of blocks in CPU memory and copies it onto the
GPU for its forward (optionally prefetching on a CUDA stream). It is built for inference. This
probe trains two LoRA steps (AdamW) on a small LongCat-Video DiT with and without it, with and
without gradient checkpointing, and compares the first step's LoRA gradients and the LoRA weights
after the second step with the plain run's, and where the LoRA weights and optimizer state ended
up; for sampling it compares one no-grad forward. Our block swap (``musubi_blocks_to_swap``) runs
the same cases for comparison. Prints one line per case: ok with the differences and peak memory,
or the error raised.

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


def step(model, device, *, train: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """One forward (no grad), or two LoRA training steps with AdamW as the trainer runs them.

    Returns the output, the first step's LoRA gradients, and after the second optimizer step the
    LoRA weights and the devices they and their optimizer state ended on (group offload moves every
    parameter of a group, the trainable ones included, back to the CPU after its forward).
    """
    latents, timesteps, text, mask = inputs(device)
    if not train:
        with torch.no_grad():
            return model(latents, timesteps, text, mask, num_cond_latents=1, return_dict=False)[0].float(), {}, {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    initial = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    grads: dict[str, torch.Tensor] = {}
    for iteration in range(2):
        out = model(latents, timesteps, text, mask, num_cond_latents=1, return_dict=False)[0]
        out[:, :, 1:].float().pow(2).mean().backward()
        if iteration == 0:
            grads = {
                n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None
            }
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lora = {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state_devices = {
        str(v.device) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
    }
    after = {
        "lora": lora,
        "update": {n: lora[n] - initial[n] for n in lora},
        "lora_param_devices": sorted({str(p.device) for p in trainable}),
        "optimizer_state_devices": sorted(state_devices),
    }
    return out.detach().float(), grads, after


def case(name: str, *, checkpointing: bool, offload: str | None, train: bool, reference) -> dict:
    device = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))  # PROBE_DEVICE=cpu: a dry run of the code
    model = build(device)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train(train)
    if offload == "block_swap":  # ours (musubi_blocks_to_swap), the comparison: 4 of 6 blocks in CPU memory
        try:
            model.enable_block_swap(4, "cpu")  # the host's swap manager: needs SimpleTuner installed
        except ImportError as error:
            return {"case": name, "ok": False, "error": f"not run: {error}"}
        for index in model.swapped_blocks:
            model.blocks[index].to("cpu")
    elif offload:
        model.to("cpu")
        model.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type=offload.removesuffix("_nostream"),
            num_blocks_per_group=1 if offload.startswith("block_level") else None,
            use_stream=device.type == "cuda" and not offload.endswith("_nostream"),
        )
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result: dict = {"case": name}
    try:
        out, grads, after = step(model, device, train=train)
        result["ok"] = True
        if after:
            result["lora_param_devices"] = after["lora_param_devices"]
            result["optimizer_state_devices"] = after["optimizer_state_devices"]
        if cuda:
            torch.cuda.synchronize()
            result["peak_MiB"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if reference is not None:
            ref_out, ref_grads, ref_after = reference
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
                # After two AdamW steps: do the LoRA weights match the plain run's?
                result["max_lora_diff_after_2_steps"] = max(
                    float((after["lora"][n] - ref_after["lora"][n]).abs().max()) for n in ref_after["lora"]
                )
                # The two optimizer updates against the plain run's, per LoRA tensor: relative error
                # |ours - plain| / |plain| (bf16 noise is a few %), and how many tensors did not move.
                errors = {
                    n: float((after["update"][n] - u).norm() / u.norm().clamp_min(1e-12))
                    for n, u in ref_after["update"].items()
                }
                result["update_rel_error_median"] = round(sorted(errors.values())[len(errors) // 2], 4)
                result["update_rel_error_max"] = round(max(errors.values()), 4)
                result["lora_tensors_not_updated"] = sum(
                    int(float(after["update"][n].abs().max()) == 0.0) for n in ref_after["update"]
                )
        result["_value"] = (out, grads, after)
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
        for offload in ("block_level", "block_level_nostream", "leaf_level", "block_swap"):
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
