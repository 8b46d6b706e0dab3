"""The plugin's config, read once: one frozen :class:`Settings`, and every config rule the family checks.

:func:`read_settings` parses the plugin's own keys (``spec.CONFIG_OPTIONS``) when the family is
set up, before anything is read from the checkpoint, and refuses a bad value by name; the family
keeps the result and never parses those keys again. :func:`check_run_config` checks the host's
keys the family depends on (block swap, checkpoint interval, compiled blocks with quantisation,
context parallelism, frames, sizes and buckets) once the host has read its own config. The ranges of the block-sparse
settings are the kernels' (``kernels.block_sparse.check_settings``), not restated here.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core import attention_bsa
from simpletuner_longcat_video.core.attention import AttentionOptions, xformers_available
from simpletuner_longcat_video.core.transformer import check_blocks_to_swap
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import datasets
from simpletuner_longcat_video.host.patches import HostDefault
from simpletuner_longcat_video.kernels.block_sparse import BlockSparseArgumentError

logger = logging.getLogger("simpletuner_longcat_video.host.settings")


@dataclass(frozen=True)
class Settings:
    """The plugin's keys, parsed and checked: what the family reads instead of the raw config."""

    attention: AttentionOptions
    compile_blocks: bool | None  # None: "auto", decided by compile_blocks_for once the device is known
    distill_lora: str | None  # an existing file, or None
    checkpoint_saves: str = "none"  # a level of core.selective_checkpoint.LEVELS ("auto" resolved)
    checkpoint_saves_reason: str = ""  # why: the user's value, or what "auto" found
    # longcat_condition_frames in config.json: the continuation condition of every video dataset
    # without start frames or a value of its own (0 = none); datasets.prepare_datasets applies it.
    condition_frames: int = 0


def read_settings(config: object) -> Settings:
    """The plugin's keys of ``config`` as :class:`Settings`; raises ``LongCatVideoError`` for a bad one."""
    attention = attention_options_from_config(config)
    compile_blocks = compile_blocks_requested(config)
    saves, reason = checkpoint_saves_from_config(config, attention, compile_blocks)
    return Settings(
        attention=attention,
        compile_blocks=compile_blocks,
        distill_lora=distill_lora_path(config),
        checkpoint_saves=saves,
        checkpoint_saves_reason=reason,
        condition_frames=global_condition_frames(config),
    )


def global_condition_frames(config: object) -> int:
    """``longcat_condition_frames`` of the config (0 when unset), refused unless 0 or 4k + 1."""
    raw = getattr(config, spec.CONDITION_FRAMES_KEY, None)
    if raw is None or (isinstance(raw, str) and raw.strip() in ("", "None")):
        return 0
    return datasets.condition_frames_value(raw, spec.CONDITION_FRAMES_KEY)


def check_run_config(config: object, settings: Settings, compute_device: torch.device | str) -> None:
    """The host's keys the family depends on, checked before any weight loads."""
    datasets.check_training_config(config)
    check_block_swap_config(config, compute_device)
    check_checkpoint_interval_config(config)
    check_compile_config(config, settings)
    check_context_parallel_config(config)


def check_config_before_launch(config: object) -> None:
    """Every rule that needs no weights, on the host's parsed config, in the order the family checks them.

    What ``simpletuner train`` runs in its own process before it starts ``accelerate launch``
    (``patches.refuse_bad_config_before_launch``), so a bad config stops in seconds instead of after
    the trainer's start-up; the family checks the same rules again in the trainer.
    """
    check_flavour(config)
    settings = read_settings(config)
    check_checkpoint_weights(getattr(config, "pretrained_model_name_or_path", None))
    check_run_config(config, settings, "cuda" if torch.cuda.is_available() else "cpu")
    backends = datasets.read_data_backend_list(config)
    if backends is not None:
        datasets.check_continuation_datasets(config, backends, settings.condition_frames)


def check_checkpoint_weights(path: str | None) -> None:
    """A local checkpoint: its layout, its text encoder's class, and its DiT's weight names and shapes
    (from the safetensors headers), all before anything is loaded or cached."""
    from simpletuner_longcat_video.core.checkpoint import check_checkpoint_layout, is_local
    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel

    check_checkpoint_layout(path)
    if path and is_local(path):
        LongCatVideoTransformer3DModel.check_weight_names(path)


def check_flavour(config: object) -> None:
    """``model_flavour`` must be one of ``spec.FLAVOURS`` (unset means the default)."""
    # The host checks the flavour only when it has to resolve a hub path; a local checkpoint
    # folder with a typo'd flavour would otherwise pass silently.
    flavour = getattr(config, "model_flavour", None) or spec.DEFAULT_FLAVOUR
    if flavour not in spec.FLAVOURS:
        raise LongCatVideoError(
            where="model_flavour",
            value=flavour,
            rule=f"LongCat-Video ({spec.FAMILY}) has the flavours {sorted(spec.FLAVOURS)}",
            fix='set "model_flavour": "final" (the same weights serve T2V and I2V)',
        )


def apply_flow_shift_default(config: object) -> None:
    """Flow matching with shift 12.0 unless the user set ``flow_schedule_shift`` themselves."""
    shift = getattr(config, "flow_schedule_shift", None)
    if shift is None or type(shift) is HostDefault:
        config.flow_schedule_shift = spec.FLOW_SHIFT
        logger.info(
            "flow_schedule_shift not set: using LongCat-Video's %.1f (set it in the config to override)",
            spec.FLOW_SHIFT,
        )


def attention_options_from_config(config: object) -> AttentionOptions:
    """The DiT's attention options from the config keys the plugin adds (spec.CONFIG_OPTIONS)."""
    defaults = {option.name: option.default for option in spec.CONFIG_OPTIONS}

    def value(name: str) -> object:
        found = getattr(config, name, None)
        return defaults[name] if found is None else found

    backend = str(value("attention_implementation"))
    if backend not in spec.ATTENTION_IMPLEMENTATIONS:
        raise LongCatVideoError(
            where="attention_implementation",
            value=backend,
            rule=f"must be one of {list(spec.ATTENTION_IMPLEMENTATIONS)}",
            fix='use "auto" unless you need to force a backend',
        )
    if backend == "block_sparse":
        found = attention_bsa.prerequisites()
        if not found:
            raise LongCatVideoError(
                where="attention_implementation",
                value=backend,
                rule=f"the block-sparse kernels are Triton kernels for CUDA GPUs; this machine has none ({found.reason})",
                fix='use "auto" (block-sparse on a CUDA GPU where the kernels run, SDPA elsewhere) or "sdpa"; '
                "on a GPU machine install torch with CUDA and triton",
            )
    if backend == "xformers":
        if not xformers_available():
            raise LongCatVideoError(
                where="attention_implementation",
                value=backend,
                rule="xFormers is not installed in this environment",
                fix='pip install xformers (matching your torch build), or use "auto"',
            )
    raw_chunk = value("longcat_bsa_chunk")
    try:
        chunk = tuple(int(part) for part in str(raw_chunk).replace("x", ",").split(","))
    except ValueError:
        chunk = ()
    if len(chunk) != 3:
        raise LongCatVideoError(
            where="longcat_bsa_chunk",
            value=raw_chunk,
            rule="must be three positive integers T,H,W",
            fix='use the default "4,4,8" (128 tokens per block)',
        )
    sparsity = _as_float(value("longcat_bsa_sparsity"))
    threshold = getattr(config, "longcat_bsa_cdf_threshold", None)
    threshold = None if threshold is None else _as_float(threshold)
    raw = {"chunk": raw_chunk, "sparsity": value("longcat_bsa_sparsity"), "cdf_threshold": threshold}
    options = AttentionOptions(backend=backend, sparsity=sparsity, chunk=chunk, cdf_threshold=threshold)
    try:
        # The block-sparse settings' rules live with the kernels (kernels.block_sparse.check_settings);
        # they are checked whatever the backend, since "auto" picks the kernels on a GPU.
        attention_bsa.check_options(options)
    except BlockSparseArgumentError as error:
        raise LongCatVideoError(
            where=f"longcat_bsa_{error.argument}", value=raw[error.argument], rule=error.rule, fix=error.fix
        ) from error
    return options


def compile_blocks_requested(config: object) -> bool | None:
    """``longcat_compile_blocks`` as True/False, or None for ``auto`` (the default; also when unset).

    The host hands JSON booleans over as "true"/"false" strings, or as bools.
    """
    raw = getattr(config, "longcat_compile_blocks", None)
    if raw is None or isinstance(raw, bool):
        return raw
    value = str(raw).strip().lower()
    if value not in ("auto", "true", "false"):
        raise LongCatVideoError(
            where="longcat_compile_blocks",
            value=raw,
            rule="must be auto, true or false",
            fix="leave it out (auto: compiled on CUDA where measured faster), or set true / false",
        )
    return None if value == "auto" else value == "true"


def compile_blocks_for(config: object, settings: Settings, compute_device: torch.device | str) -> tuple[bool, str]:
    """Whether the DiT blocks are compiled in this run, and why (for the log line).

    ``auto`` compiles only in the setting that was measured faster on the H200 (a bf16 base on
    CUDA, no block swap, no context parallelism); everything else stays eager unless asked for.
    """
    if settings.compile_blocks is not None:
        return settings.compile_blocks, "longcat_compile_blocks: " + str(settings.compile_blocks).lower()
    precision = str(getattr(config, "base_model_precision", None) or "no_change")
    blocks_to_swap = int(getattr(config, "musubi_blocks_to_swap", 0) or 0)
    context_parallel = int(getattr(config, "context_parallel_size", 1) or 1)
    if torch.device(compute_device).type != "cuda":
        return False, "auto: eager off CUDA"
    if precision != "no_change":
        return False, f"auto: eager with base_model_precision {precision} (compiled not measured there)"
    if blocks_to_swap:
        return False, "auto: eager with block swap (compiled not measured there)"
    if _offload_backend(config) and settings.checkpoint_saves != "none":
        return False, (
            f"auto: eager with gradient_checkpointing_backend {_offload_backend(config)} and longcat_checkpoint_saves "
            f"{settings.checkpoint_saves} (compiled blocks keep their saves where the offload cannot reach)"
        )
    if context_parallel > 1:
        return False, "auto: eager with context parallelism (compiled not measured there)"
    return True, "auto: compiled on CUDA with a bf16 base"


def check_compile_config(config: object, settings: Settings) -> None:
    """Compiled blocks cannot carry optimum-quanto weights (refused before anything loads)."""
    precision = str(getattr(config, "base_model_precision", "") or "")
    if settings.compile_blocks and "quanto" in precision:
        raise LongCatVideoError(
            where="longcat_compile_blocks",
            value=f"true with base_model_precision {precision!r}",
            rule="torch.compile cannot trace optimum-quanto weights (on an H100 it fails at the first step)",
            fix="leave longcat_compile_blocks at auto (eager with quanto) when you train on a quanto-quantised "
            "base, or drop the quantisation",
        )


def checkpoint_saves_from_config(
    config: object, attention: AttentionOptions, compile_blocks: bool | None
) -> tuple[str, str]:
    """``longcat_checkpoint_saves`` as a level, and why.

    ``auto`` is ``attention``, except ``none`` where a level cannot apply (below) or where the config
    already trades speed for memory (a quantised base, block swap, the host's activation offload):
    kept outputs would spend the memory those options free. An explicit level where it cannot apply is refused by name.
    """
    raw = getattr(config, "longcat_checkpoint_saves", None)
    value = "auto" if raw in (None, "") else str(raw).strip().lower()
    if value not in spec.CHECKPOINT_SAVES:
        raise LongCatVideoError(
            where="longcat_checkpoint_saves",
            value=raw,
            rule=f"must be one of {list(spec.CHECKPOINT_SAVES)}",
            fix='use "auto" (attention where it applies), "none", "attention", "attention+proj" or "attention+ffn"; '
            "docs/memory.md says which fits your GPU",
        )
    conflict = _checkpoint_saves_conflict(config, attention, compile_blocks)
    if value == "auto":
        if conflict is not None:
            return "none", f"auto, and none with {conflict[0]}"
        saving = _memory_options(config)
        if saving:
            return "none", f"auto, and none with {saving}, which saves memory"
        return "attention", "auto"
    if value != "none" and conflict is not None:
        with_what, rule, fix = conflict
        raise LongCatVideoError(where="longcat_checkpoint_saves", value=f"{value} with {with_what}", rule=rule, fix=fix)
    return value, "set in the config"


def _offload_backend(config: object) -> str | None:
    backend = str(getattr(config, "gradient_checkpointing_backend", None) or "torch").lower()
    return backend if backend.startswith("unsloth") else None


def _memory_options(config: object) -> str:
    """The options of ``config`` that trade speed for memory, named for the log ('' when none)."""
    found = []
    precision = str(getattr(config, "base_model_precision", None) or "no_change")
    if precision != "no_change":
        found.append(f"base_model_precision {precision}")
    if int(getattr(config, "musubi_blocks_to_swap", 0) or 0) > 0:
        found.append("musubi_blocks_to_swap")
    if _offload_backend(config):
        found.append(f"gradient_checkpointing_backend {_offload_backend(config)}")
    return " and ".join(found)


def _checkpoint_saves_conflict(
    config: object, attention: AttentionOptions, compile_blocks: bool | None
) -> tuple[str, str, str] | None:
    """(the other setting, the rule, the fix) of the first combination no level but ``none`` works with."""
    if attention.backend == "xformers":
        return (
            "attention_implementation xformers",
            "the levels keep the outputs of PyTorch's SDPA ops and the block-sparse kernels; xFormers' ops are "
            "not among them, so attention would be recomputed anyway",
            'use attention_implementation "auto" or "sdpa", or longcat_checkpoint_saves "none"',
        )
    if compile_blocks is not True:
        # Eager, or longcat_compile_blocks auto: compile_blocks_for keeps such a run eager.
        return None
    if _offload_backend(config):
        return (
            f"longcat_compile_blocks and gradient_checkpointing_backend {_offload_backend(config)}",
            "a compiled block keeps its saves inside the compiled region, where the host's offload hooks cannot run",
            "set longcat_checkpoint_saves to none, or use gradient_checkpointing_backend torch, or leave "
            "longcat_compile_blocks out",
        )
    if int(getattr(config, "musubi_blocks_to_swap", 0) or 0) > 0:
        return (
            "longcat_compile_blocks and musubi_blocks_to_swap",
            "block swap moves a block's weights in module hooks, which split a compiled checkpoint region "
            "(the swapped blocks would run uncompiled)",
            "set longcat_checkpoint_saves to none, or leave block swap or longcat_compile_blocks out",
        )
    return None


def check_checkpoint_interval_config(config: object) -> None:
    """``gradient_checkpointing_interval`` > 1 cannot be combined with block swap (refused before loading)."""
    raw = getattr(config, "gradient_checkpointing_interval", None)
    interval = None if raw in (None, "", "None") else int(raw)
    if interval is None or interval <= 1 or not int(getattr(config, "musubi_blocks_to_swap", 0) or 0):
        return
    raise LongCatVideoError(
        where="gradient_checkpointing_interval",
        value=f"{interval} with musubi_blocks_to_swap {config.musubi_blocks_to_swap}",
        rule="block swap streams one block at a time, and a checkpoint of several blocks recomputes them together",
        fix="leave gradient_checkpointing_interval unset with block swap (or turn block swap off)",
    )


def _dit_config_value(path: str | None, key: str, default: int) -> int:
    if path:
        config_file = os.path.join(os.path.expanduser(path), spec.DIT_SUBFOLDER, "config.json")
        if os.path.isfile(config_file):
            with open(config_file) as handle:
                return int(json.load(handle).get(key, default))
    return default


def checkpoint_depth(path: str | None) -> int:
    """The DiT's block count from a local checkpoint's dit/config.json (48 for the hub id)."""
    return _dit_config_value(path, "depth", spec.NUM_BLOCKS)


def check_context_parallel_config(config: object) -> None:
    """``context_parallel_size`` must divide the DiT's heads (checked before any weight loads)."""
    raw = getattr(config, "context_parallel_size", None)
    if raw in (None, "", "None"):
        return
    size = int(raw)
    if size <= 1:
        return
    heads = _dit_config_value(getattr(config, "pretrained_model_name_or_path", None), "num_heads", spec.NUM_HEADS)
    if heads % size:
        raise LongCatVideoError(
            where="context_parallel_size",
            value=size,
            rule=f"the all-to-all over heads gives every rank heads/{size}; the DiT has {heads} heads",
            fix=f"use a size that divides {heads} (2, 4 or 8 for the official model)",
        )
    frames = getattr(config, "validation_num_video_frames", None)
    if frames:
        latent = spec.FRAME_RULE.latent_frames(int(frames))
        if latent < size:
            raise LongCatVideoError(
                where="validation_num_video_frames",
                value=frames,
                rule=f"context parallelism gives each of the {size} ranks whole latent frames; "
                f"{frames} frames are {latent} latent frames",
                fix=f"render at least {spec.VAE_TEMPORAL_COMPRESSION * (size - 1) + 1} frames, "
                "or lower context_parallel_size",
            )


def warn_fsdp_inactive(config: object, accelerator: Any) -> str | None:
    """Warn (and return the message) when ``fsdp_enable`` is set but accelerate did not turn FSDP on.

    accelerate 1.x only switches a run to FSDP from a multi-*accelerator* setup (``MULTI_GPU``,
    ``MULTI_XPU``, ...; ``accelerate/state.py``, ``AcceleratorState.__init__``): a CPU run with
    ``ACCELERATE_USE_CPU=1`` stays ``MULTI_CPU`` and trains with plain DDP, every rank holding the
    whole DiT. SimpleTuner 4.10.1 says nothing about it, so a user sizing memory for a sharded
    model would be misled.
    """
    if not getattr(config, "fsdp_enable", False) or accelerator is None:
        return None
    distributed_type = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
    if distributed_type == "FSDP":
        return None
    message = (
        f"LongCat-Video: fsdp_enable is set, but accelerate runs this job as {distributed_type or 'NO'}, "
        "not FSDP: every process holds the whole DiT (no sharding). accelerate enables FSDP only for "
        "multi-GPU/accelerator runs, never for MULTI_CPU (gloo) or a single process; on CPU this run "
        "trains with DDP instead"
    )
    if getattr(accelerator, "is_main_process", True):
        logger.warning("%s", message)
    return message


def check_block_swap_config(config: object, compute_device: torch.device | str) -> None:
    """``musubi_blocks_to_swap`` / ``musubi_block_swap_device``, refused before any weight loads."""
    blocks = getattr(config, "musubi_blocks_to_swap", None)
    if blocks is None or blocks == 0:
        return
    check_blocks_to_swap(blocks, checkpoint_depth(getattr(config, "pretrained_model_name_or_path", None)))
    raw_device = getattr(config, "musubi_block_swap_device", None) or "cpu"
    try:
        device = torch.device(raw_device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type == "meta":
        raise LongCatVideoError(
            where="musubi_block_swap_device",
            value=raw_device,
            rule="must name a torch device that holds the swapped blocks",
            fix='use "cpu" (the usual choice) or another accelerator such as "cuda:1"',
        )
    compute = torch.device(compute_device)
    if device.type == compute.type and (device.index or 0) == (compute.index or 0):
        raise LongCatVideoError(
            where="musubi_block_swap_device",
            value=raw_device,
            rule=f"is the training device ({compute}), so block swap would move nothing",
            fix="set musubi_blocks_to_swap to 0: block swap streams blocks onto a GPU, and this run trains on the CPU"
            if compute.type == "cpu"
            else 'use "cpu", or set musubi_blocks_to_swap to 0',
        )


def distill_lora_path(config: object) -> str | None:
    """``longcat_validation_distill_lora`` as an existing file path, or None when unset."""
    raw = getattr(config, "longcat_validation_distill_lora", None)
    if raw in (None, ""):
        return None
    path = os.path.expanduser(str(raw))
    if not os.path.isfile(path):
        raise LongCatVideoError(
            where="longcat_validation_distill_lora",
            value=raw,
            rule="the distillation LoRA file does not exist",
            fix=f"point it at <checkpoint>/{spec.DISTILL_LORA_FILE} of the downloaded LongCat-Video, or unset it",
        )
    return path


def _as_float(value: object) -> float:
    # Not a number reads as NaN, which fails every range rule below and so gets its message.
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return float("nan")
