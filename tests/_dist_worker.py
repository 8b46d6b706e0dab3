"""One process of the multi-process tests (``tests/test_distributed.py``); also runs alone as the reference.

Every process builds the same tiny LongCat-Video DiT and the same LoRA (peft, as the host adds it)
from fixed seeds, and the same two training samples with fixed noise and sigmas. With one process
the batch holds both samples; with two, rank r trains on sample r. The loss is the family's own:
the batch goes through ``training.apply_i2v_condition`` and ``family.LongCatVideo.model_predict``,
the target is ``noise - latents`` without the condition frame, MSE.

Modes (argv[1]); the result is written by rank 0 to argv[2] with ``torch.save``:

* ``accelerate``: the host's engine (``accelerate.Accelerator``, DDP when launched with two
  processes). ``--no-sync`` skips the gradient all-reduce, as a control that the comparison can fail.
  ``--context-parallel``: both ranks take both samples and split their frames (context parallelism,
  the group of all ranks), with the loss scaled as SimpleTuner's trainer scales it.
* ``fsdp2``: torch's ``fully_shard`` on each ``LongCatVideoTransformerBlock`` and then on the root,
  frozen DiT sharded, LoRA trainable; then a ``torch.distributed.checkpoint`` save, a load into a
  fresh model and optimiser, and one more step on both.
* ``all``: the two-process runs of ``tests/test_distributed.py`` in one launch (each process starts
  in about 20 s, most of a run's cost): ``accelerate`` as DDP, with ``--context-parallel``, with
  ``--no-sync``, then ``fsdp2``, one after the other in the same process group, each on a model and
  optimiser of its own; argv[2] then holds ``{mode name: that mode's result}``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

STEPS = 4
LR = 1e-3
SAMPLES = 2
TEXT_LEN = 6
VALID_TOKENS = (4, 6)  # per-sample text lengths differ, so the mask path is part of the comparison


def build_model() -> torch.nn.Module:
    from peft import LoraConfig

    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel
    from simpletuner_longcat_video.testing.tiny import TEXT_DIM

    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(
        in_channels=16,
        out_channels=16,
        hidden_size=64,
        depth=2,
        num_heads=4,
        caption_channels=TEXT_DIM,
        adaln_tembed_dim=32,
        frequency_embedding_size=64,
    )
    # A fresh DiT has zero-initialised output layers; random values make every LoRA matter.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.05)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=True, target_modules=list(LORA_TARGET_MODULES)))
    # peft starts lora_B at zero, so step 1 would train only B; a seeded B trains A and B from step 1.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.02)
    return model


def samples() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1234)
    out = []
    for index in range(SAMPLES):
        latents = torch.randn(1, 16, 3, 8, 8, generator=generator)
        noise = torch.randn(1, 16, 3, 8, 8, generator=generator)
        sigma = torch.tensor([0.3 + 0.4 * index])
        text = torch.randn(1, TEXT_LEN, 32, generator=generator)
        mask = torch.zeros(1, TEXT_LEN, dtype=torch.long)
        mask[:, : VALID_TOKENS[index]] = 1
        text = text * mask[..., None]
        cond = latents[:, :, :1].clone()
        out.append(dict(latents=latents, noise=noise, sigma=sigma, text=text, mask=mask, cond=cond))
    return out


def batch_for(rank: int, world: int) -> dict[str, torch.Tensor]:
    """Sample ``rank`` alone with two processes; both samples, in one batch, with one process."""
    chosen = samples() if world == 1 else [samples()[rank]]
    return {key: torch.cat([sample[key] for sample in chosen]) for key in chosen[0]}


def family_loss(model: torch.nn.Module, data: dict[str, torch.Tensor]) -> torch.Tensor:
    """The family's training loss for ``data`` (the host's prepare_batch math, then our hooks)."""
    from simpletuner_longcat_video.core.conditioning import apply_i2v_condition, drop_condition_frames
    from simpletuner_longcat_video.host.family import LongCatVideo

    sigma = data["sigma"].view(-1, 1, 1, 1, 1)
    batch = {
        "latents": data["latents"],
        "noisy_latents": (1 - sigma) * data["latents"] + sigma * data["noise"],
        "timesteps": data["sigma"] * 1000,
        "conditioning_latents": data["cond"],
        "encoder_hidden_states": data["text"],
        "encoder_attention_mask": data["mask"],
    }
    batch = apply_i2v_condition(batch)
    family = SimpleNamespace(model=model, config=SimpleNamespace(weight_dtype=torch.float32))
    prediction = LongCatVideo.model_predict(family, batch)["model_prediction"]
    target = drop_condition_frames(data["noise"] - batch["latents"], batch)
    return F.mse_loss(prediction.float(), target.float())


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    def full(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()

    return {name: full(p) for name, p in model.named_parameters() if "lora_" in name}


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    def full(tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()

    return {name: full(p.grad) for name, p in model.named_parameters() if "lora_" in name}


def run_accelerate(out: Path, no_sync: bool, context_parallel: bool = False, *, own_group: bool = True) -> dict | None:
    """Train under accelerate; rank 0 returns the result (``None`` elsewhere). ``own_group``: rank 0
    also writes it to ``out`` and the process group ends; otherwise the group is left to the caller."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from simpletuner.helpers.training.context_parallel import (
        build_context_parallel_topology,
        scale_standalone_context_parallel_loss,
    )

    accelerator = Accelerator(cpu=True)
    model = build_model()
    topology = None
    if context_parallel:
        world = accelerator.num_processes
        topology = build_context_parallel_topology(
            SimpleNamespace(), world_size=world, cp_size=world, strategy="alltoall"
        )
        model.enable_context_parallel(dist.group.WORLD)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    lora_init = lora_state(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Context parallelism: every rank of the group holds the same (whole) batch.
    data = batch_for(0, 1) if context_parallel else batch_for(accelerator.process_index, accelerator.num_processes)
    losses, first_grads = [], None
    for _ in range(STEPS):
        if no_sync:
            with accelerator.no_sync(model):
                loss = family_loss(model, data)
                accelerator.backward(loss)
        else:
            loss = family_loss(model, data)
            accelerator.backward(scale_standalone_context_parallel_loss(loss, topology))
        # The batch loss of the doubled batch is the mean of the per-rank losses (equal sizes).
        losses.append(float(accelerator.gather(loss.detach()[None]).mean()))
        if first_grads is None:
            first_grads = lora_grads(accelerator.unwrap_model(model))
        optimizer.step()
        optimizer.zero_grad()
    result = None
    if accelerator.is_main_process:
        result = {
            "world": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type),
            "backend": accelerator.state.backend,
            "losses": losses,
            "first_grads": first_grads,
            "lora_init": lora_init,
            "lora": lora_state(accelerator.unwrap_model(model)),
        }
    accelerator.wait_for_everyone()
    if own_group:
        if result is not None:
            torch.save(result, out)
        accelerator.end_training()
    return result


def _shard(model: torch.nn.Module, mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformerBlock

    blocks = [module for module in model.modules() if isinstance(module, LongCatVideoTransformerBlock)]
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def run_fsdp2(out: Path, *, own_group: bool = True) -> dict | None:
    """FSDP2 training, DCP save (beside ``out``) and resume; rank 0 returns the result. ``own_group``:
    the process group is made here, rank 0 writes the result to ``out``, and the group ends;
    otherwise the caller's group is used and left open."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    if own_group:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def sharded_model_and_optimizer():
        model = build_model()
        _shard(model, mesh)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        return model, optimizer

    def step(model, optimizer, data) -> float:
        loss = family_loss(model, data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        return float(mean) / world

    model, optimizer = sharded_model_and_optimizer()
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    # Evidence that the frozen DiT is sharded: every frozen weight is a DTensor holding 1/world of its rows.
    sharded_frozen = sum(
        isinstance(p, DTensor) and p.to_local().shape[0] == -(-p.shape[0] // world) for p in frozen.values()
    )
    local_numel = sum(p.to_local().numel() for p in frozen.values())
    full_numel = sum(p.numel() for p in frozen.values())
    data = batch_for(rank, world)

    losses, first_grads = [], None
    for _ in range(STEPS):
        loss = family_loss(model, data)
        loss.backward()
        if first_grads is None:
            first_grads = lora_grads(model)
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
    lora_after_training = lora_state(model)

    checkpoint = out.with_suffix(".dcp")
    dcp.save(
        {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=str(checkpoint),
    )
    # Resume into a fresh model whose LoRA differs from the trained one, so a load that does nothing fails.
    resumed, resumed_optimizer = sharded_model_and_optimizer()
    lora_before_load = lora_state(resumed)
    state = {"model": get_model_state_dict(resumed), "optimizer": get_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_model_state_dict(resumed, state["model"])
    set_optimizer_state_dict(resumed, resumed_optimizer, state["optimizer"])
    lora_resumed = lora_state(resumed)
    # One more step on the original and on the resumed run: the optimiser state must have come back too.
    next_loss = step(model, optimizer, data)
    next_loss_resumed = step(resumed, resumed_optimizer, data)
    after_next, after_next_resumed = lora_state(model), lora_state(resumed)

    result = None
    if rank == 0:
        result = {
            "world": world,
            "backend": dist.get_backend(),
            "frozen_params": len(frozen),
            "sharded_frozen_params": sharded_frozen,
            "frozen_local_numel": local_numel,
            "frozen_full_numel": full_numel,
            "losses": losses,
            "first_grads": first_grads,
            "lora": lora_after_training,
            "lora_before_load": lora_before_load,
            "lora_resumed": lora_resumed,
            "next_loss": next_loss,
            "next_loss_resumed": next_loss_resumed,
            "lora_next": after_next,
            "lora_next_resumed": after_next_resumed,
            "checkpoint_files": sorted(p.name for p in checkpoint.iterdir()),
        }
        if own_group:
            torch.save(result, out)
    dist.barrier()
    if own_group:
        dist.destroy_process_group()
    return result


def run_all(out: Path) -> None:
    """Every two-process mode in one launch (see the module docstring); rank 0 writes ``out``."""
    import torch.distributed as dist

    results = {
        "ddp": run_accelerate(out, no_sync=False, own_group=False),
        "context_parallel": run_accelerate(out, no_sync=False, context_parallel=True, own_group=False),
        "no_sync": run_accelerate(out, no_sync=True, own_group=False),
    }
    # The accelerator made the gloo group; FSDP2 shards over that same group of all ranks.
    results["fsdp2"] = run_fsdp2(out, own_group=False)
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    # Two processes on two cores: one thread each keeps them from fighting over the cores.
    torch.set_num_threads(1)
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "accelerate":
        run_accelerate(out, no_sync="--no-sync" in sys.argv, context_parallel="--context-parallel" in sys.argv)
    elif mode == "fsdp2":
        run_fsdp2(out)
    elif mode == "all":
        run_all(out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
