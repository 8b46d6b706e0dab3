"""The host's training step in this process: how the mutation tests of tests/test_learning.py train.

A host run costs half a minute of start-up before its first step; six of them (one per mutation
and a control) would not fit the suite's budget. This loop runs the same per-step code the host's
trainer runs, in the test process, on the demo's checkpoint, data and config: the host's
``ModelFoundation.prepare_batch`` (noise, sigma sampling with the config's shift, noisy latents,
then our ``prepare_batch_conditions``), our ``model_predict``, the host's ``loss`` with our
``get_prediction_target``; the LoRA is the one the host adds (peft, the config's rank, alpha and
dropout, the DiT's target modules), AdamW with the host's ``adamw_bf16`` defaults, the config's
gradient clipping. What it leaves out is the trainer's bookkeeping (data loaders, caches,
checkpoints, logging), which the demo's host run in test_i2v_training.py covers. A mutation
patches ``simpletuner_longcat_video.host.family``, the module the host calls, in the same way.
Continuation batches (:func:`train_continuation_and_check`) name their dataset, whose K the family
reads from the host's ``StateTracker`` as in a host run (test_continuation_training.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import torch

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.testing.learning import (
    Clip,
    LearningCheck,
    Pair,
    clip_latents,
    continuation_errors,
    latent_errors,
    read_clip,
)

# The dataset id continuation batches name (the host's collate names each batch's dataset).
CONTINUATION_DATASET = "learning-continuation"


def host_config(config_path: Path):
    """``config.json`` parsed by the host's own argument parser, with what its trainer adds before step 1."""
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser

    from simpletuner_longcat_video.host.settings import apply_flow_shift_default

    config = json.loads(Path(config_path).read_text())
    args = [f"--{key}={value}" for key, value in config.items() if not isinstance(value, bool)]
    args += [f"--{key}" for key, value in config.items() if value is True]
    parsed, unknown = get_argument_parser().parse_known_args(args)
    assert not unknown, unknown
    apply_flow_shift_default(parsed)
    parsed.weight_dtype = torch.float32  # mixed_precision "no"
    parsed.flow_matching = True  # the trainer's value for a flow-matching family
    return parsed


def _batches(pipe, pairs: list[Pair]) -> list[dict]:
    """What the host's collate hands ``prepare_batch`` for each pair (batch size 1)."""
    from PIL import Image

    batches = []
    for pair in pairs:
        frames = read_clip(pair.clip)
        width, height = frames[0].size
        start = Image.open(pair.start_frame).convert("RGB")
        states, mask = pipe.encode_prompt(pair.caption, torch.device("cpu"))
        batches.append(
            {
                "latent_batch": clip_latents(pipe, frames, height, width),
                "conditioning_latents": clip_latents(pipe, [start], height, width),
                "prompt_embeds": states,
                "encoder_attention_mask": mask,
            }
        )
    return batches


def _continuation_batches(pipe, clips: list[Clip]) -> list[dict]:
    """What the host's collate hands ``prepare_batch`` for each clip of a continuation dataset (batch size 1)."""
    batches = []
    for item in clips:
        frames = read_clip(item.clip)
        width, height = frames[0].size
        states, mask = pipe.encode_prompt(item.caption, torch.device("cpu"))
        batches.append(
            {
                "latent_batch": clip_latents(pipe, frames, height, width),
                "prompt_embeds": states,
                "encoder_attention_mask": mask,
                "data_backend_id": CONTINUATION_DATASET,
            }
        )
    return batches


def train_and_check(checkpoint: Path, config_path: Path, pairs: list[Pair], steps: int | None = None) -> LearningCheck:
    """Train a LoRA on ``pairs`` with the host's step code, then the learning check on the same pairs."""
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    pipe = load_pipeline(str(checkpoint))
    before = latent_errors(pipe, pairs)
    with torch.no_grad():
        batches = _batches(pipe, pairs)
    _train(pipe, host_config(config_path), batches, steps)
    after = latent_errors(pipe, pairs)
    return LearningCheck(names=tuple(pair.clip.stem for pair in pairs), before=tuple(before), after=tuple(after))


def train_continuation_and_check(
    checkpoint: Path, config_path: Path, clips: list[Clip], condition_frames: int, steps: int | None = None
) -> LearningCheck:
    """The same for a continuation dataset: each clip trained and then continued from its first frames."""
    from simpletuner.helpers.training.state_tracker import StateTracker

    from simpletuner_longcat_video.core.pipeline import load_pipeline

    pipe = load_pipeline(str(checkpoint))
    before = continuation_errors(pipe, clips, condition_frames)
    with torch.no_grad():
        batches = _continuation_batches(pipe, clips)
    # The dataset as the family reads it for each batch: its video block after prepare_datasets.
    configured = {CONTINUATION_DATASET: {"config": {"video": {spec.CONDITION_FRAMES_KEY: condition_frames}}}}
    previous = StateTracker.data_backends
    StateTracker.data_backends = configured
    try:
        _train(pipe, host_config(config_path), batches, steps)
    finally:
        StateTracker.data_backends = previous
    after = continuation_errors(pipe, clips, condition_frames)
    return LearningCheck(names=tuple(item.clip.stem for item in clips), before=tuple(before), after=tuple(after))


def _train(pipe, config, batches: list[dict], steps: int | None) -> None:
    """A LoRA added to ``pipe.transformer`` and trained on ``batches`` in turn with the host's step code."""
    from peft import LoraConfig

    from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES
    from simpletuner_longcat_video.host.family import LongCatVideo

    model = pipe.transformer
    model.requires_grad_(False)
    torch.manual_seed(config.seed)
    model.add_adapter(
        LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha or config.lora_rank,
            lora_dropout=config.lora_dropout,
            init_lora_weights=True,
            target_modules=list(LORA_TARGET_MODULES),
        )
    )
    family = LongCatVideo.__new__(LongCatVideo)
    family.config = config
    family.accelerator = SimpleNamespace(device=torch.device("cpu"))
    family.model = model
    family.noise_schedule = pipe.scheduler
    family.diffusion_blocks_controller = None

    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-6)
    model.train()
    for step in range(steps or config.max_train_steps):
        raw = {
            key: value.clone() if torch.is_tensor(value) else value
            for key, value in batches[step % len(batches)].items()
        }
        prepared = family.prepare_batch(raw, state={"global_step": step})
        loss = family.loss(prepared, family.model_predict(prepared))
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
    model.eval()
