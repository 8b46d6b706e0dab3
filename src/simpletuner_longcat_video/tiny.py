"""A tiny LongCat-Video checkpoint and a tiny paired I2V dataset, made locally from random weights.

They exist so the real training path (the host's ``simpletuner train``, our family, the official
folder layout, the host's dataset and cache machinery) can run end to end on a laptop CPU and in
CI without any download. Every part is the real class a full download loads: our DiT,
``diffusers.AutoencoderKLWan``, ``transformers.UMT5EncoderModel`` with a ``T5TokenizerFast`` and
``FlowMatchEulerDiscreteScheduler``; only the sizes are small. The output is a random-weight model:
it tests plumbing, shapes and maths, not video quality.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simpletuner_longcat_video import spec

# Words of the tiny tokenizer's vocabulary: the demo captions are built from these.
_WORDS = (
    "a red green blue square circle moves left right up down slowly quickly over the dark light "
    "background ball box turns grows shrinks camera pans zooms in out and with on of to video clip"
).split()
TEXT_DIM = 32


@dataclass(frozen=True)
class TinySizes:
    """Sizes of the tiny model; every axis keeps the real compression factors (8x, 4x, patch 2)."""

    hidden: int = 64
    depth: int = 2
    heads: int = 4
    text_dim: int = TEXT_DIM
    vae_base_dim: int = 8


def _tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    # A Unigram vocabulary with SentencePiece's word marker, as umT5's own tokenizer has.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in _WORDS]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    # umT5 appends </s> to every sequence; the mask then covers the words plus that token.
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    tokenizer.model_max_length = spec.TEXT_MAX_TOKENS
    tokenizer.save_pretrained(folder)


def build_tiny_checkpoint(root: str | Path, *, seed: int = 0, sizes: TinySizes = TinySizes()) -> Path:
    """Write a random tiny checkpoint in the official layout under ``root``; returns ``root``."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    from simpletuner_longcat_video.transformer import LongCatVideoTransformer3DModel

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    dit = LongCatVideoTransformer3DModel(
        in_channels=spec.LATENT_CHANNELS,
        out_channels=spec.LATENT_CHANNELS,
        hidden_size=sizes.hidden,
        depth=sizes.depth,
        num_heads=sizes.heads,
        caption_channels=sizes.text_dim,
        adaln_tembed_dim=32,
        frequency_embedding_size=64,
    )
    # Random init leaves the zero-initialised output layers of a fresh DiT at zero; give every
    # parameter a small random value so predictions (and LoRA effects) are visible.
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.normal_(0.0, 0.05)
    dit.save_pretrained(root / spec.DIT_SUBFOLDER)

    vae = AutoencoderKLWan(
        base_dim=sizes.vae_base_dim,
        z_dim=spec.LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    vae.save_pretrained(root / spec.VAE_SUBFOLDER)

    config = UMT5Config(
        vocab_size=len(_WORDS) + 3,
        d_model=sizes.text_dim,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=0,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    UMT5EncoderModel(config).save_pretrained(root / spec.TEXT_ENCODER_SUBFOLDER)
    _tokenizer(root / spec.TOKENIZER_SUBFOLDER)

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec.FLOW_SHIFT).save_pretrained(
        root / spec.SCHEDULER_SUBFOLDER
    )
    (root / "README.md").write_text(
        "Tiny random LongCat-Video checkpoint made by simpletuner_longcat_video.tiny (not a real model).\n"
    )
    return root


# Modules the official cfg_step_lora covers in every block, with the number of up blocks upstream
# splits each into (fused q/k/v and k/v projections get one per projection).
DISTILL_LORA_MODULES = {
    "attn.qkv": 3,
    "attn.proj": 1,
    "cross_attn.q_linear": 1,
    "cross_attn.kv_linear": 2,
    "ffn.w1": 1,
    "ffn.w2": 1,
    "ffn.w3": 1,
}


def build_tiny_distill_lora(
    checkpoint: str | Path, *, rank: int = 4, alpha_scale: float = 0.5, seed: int = 1, std: float = 0.05
) -> Path:
    """A random LoRA for a tiny checkpoint in the official ``lora/cfg_step_lora.safetensors`` layout.

    Same structure as the real file (seven modules per block, fused projections split into up
    blocks, one ``alpha_scale`` per module), random values; returns the file's path.
    """
    import torch

    from simpletuner_longcat_video.lora_formats import LoraPart, ModuleLora, write_lora_file
    from simpletuner_longcat_video.transformer import LongCatVideoTransformer3DModel

    checkpoint = Path(checkpoint)
    with torch.device("meta"):
        dit = LongCatVideoTransformer3DModel.from_config(
            LongCatVideoTransformer3DModel.load_config(checkpoint / spec.DIT_SUBFOLDER)
        )
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for index in range(len(dit.blocks)):
        for name, splits in DISTILL_LORA_MODULES.items():
            linear = dit.blocks[index].get_submodule(name)
            rows = linear.out_features // splits
            parts = tuple(
                LoraPart(
                    down=torch.randn(rank, linear.in_features, generator=generator) * std,
                    up=torch.randn(rows, rank, generator=generator) * std,
                    scale=alpha_scale,
                )
                for _ in range(splits)
            )
            layers[f"blocks.{index}.{name}"] = ModuleLora(parts)
    path = checkpoint / spec.DISTILL_LORA_FILE
    write_lora_file(layers, path, "upstream", source=str(path))
    return path


def synthetic_clip(index: int, *, frames: int, height: int, width: int) -> np.ndarray:
    """A short clip ``[frames, H, W, 3]`` uint8: a coloured square moving over a gradient."""
    rng = np.random.default_rng(index)
    colour = rng.integers(64, 256, size=3)
    background = np.linspace(0, 96, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    size = max(4, min(height, width) // 4)
    start_y, start_x = rng.integers(0, height - size), rng.integers(0, width - size)
    step_y, step_x = rng.integers(-2, 3), rng.integers(-3, 4)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        frame = background.copy()
        y = int(np.clip(start_y + step_y * t, 0, height - size))
        x = int(np.clip(start_x + step_x * t, 0, width - size))
        frame[y : y + size, x : x + size] = colour
        video[t] = frame.astype(np.uint8)
    return video


def write_video(path: str | Path, frames: np.ndarray, fps: int = 8) -> Path:
    """Write ``[T, H, W, 3]`` uint8 frames as an H.264 mp4 (PyAV)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def build_tiny_dataset(
    root: str | Path, *, clips: int = 4, val_clips: int = 1, frames: int = 9, height: int = 64, width: int = 64
) -> dict[str, Path]:
    """Write a paired I2V dataset with a training and a validation split.

    Each split has ``clips/<name>.mp4`` + ``<name>.txt`` (caption) and ``start_frames/<name>.png``;
    the start frame of each clip is its own first frame, as a user extracting start frames would
    have it. Returns the four folders by role.
    """
    from PIL import Image

    root = Path(root)
    folders = {}
    for split, count, offset in (("train", clips, 0), ("val", val_clips, 100)):
        clip_dir, frame_dir = root / split / "clips", root / split / "start_frames"
        clip_dir.mkdir(parents=True, exist_ok=True)
        frame_dir.mkdir(parents=True, exist_ok=True)
        for index in range(offset, offset + count):
            name = f"clip_{index:03d}"
            video = synthetic_clip(index, frames=frames, height=height, width=width)
            write_video(clip_dir / f"{name}.mp4", video)
            words = _WORDS[index % 3], _WORDS[3 + index % 2], _WORDS[6 + index % 4]
            (clip_dir / f"{name}.txt").write_text(f"a {words[0]} {words[1]} {words[2]} over the dark background")
            Image.fromarray(video[0]).save(frame_dir / f"{name}.png")
        folders[f"{split}_clips"], folders[f"{split}_start_frames"] = clip_dir, frame_dir
    return folders
