"""A tiny LongCat-Video checkpoint and a tiny paired I2V dataset, made locally from random weights.

They exist so the real training path (the host's ``simpletuner train``, our family, the official
folder layout, the host's dataset and cache machinery) can run end to end on a laptop CPU and in
CI without any download. Every part is the real class a full download loads: our DiT,
``diffusers.AutoencoderKLWan``, ``transformers.UMT5EncoderModel`` with a ``T5TokenizerFast`` and
``FlowMatchEulerDiscreteScheduler``; only the sizes are small.

The weights are not a trained model, but they are shaped so that a LoRA can learn on them in a
few hundred CPU steps, as it does on the real one (see :func:`shape_trainable_dit`): the VAE works
pixel by pixel with a narrow posterior, and the DiT starts as a plain flow-matching denoiser whose
response depends on the timestep. A tiny model with every weight random cannot do that: a rank-8
LoRA on frozen random projections does not get below the zero predictor's loss in minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from simpletuner_longcat_video import spec

# Words of the tiny tokenizer's vocabulary: the demo captions are built from these.
_WORDS = (
    "a red green blue square circle moves left right up down slowly quickly over the dark light "
    "background ball box turns grows shrinks camera pans zooms in out and with on of to video clip card into other colour"
).split()
TEXT_DIM = 32

# The two colours of the learning dataset (build_learning_dataset): each training clip turns the
# start frame's colour into the other one. The tiny VAE's latent normalisation is centred between
# them, so the two clips' latents are mirror images: a model that ignores the start frame scores
# no better than the untrained one, and only reading the start frame lowers the error.
LEARNING_COLOURS = ((230, 40, 40), (40, 80, 230))
# Further colours the VAE's latent spread (latents_std) is measured on, with the two above.
_PALETTE = ((250, 250, 250), (10, 10, 10), (40, 200, 60), (240, 200, 30), (130, 60, 160), (90, 170, 200))
LEARNING_CAPTION = "the card turns into the other colour"


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

    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel

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
    shape_trainable_dit(dit, seed=seed)
    dit.save_pretrained(root / spec.DIT_SUBFOLDER)

    vae = AutoencoderKLWan(
        base_dim=sizes.vae_base_dim,
        z_dim=spec.LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    shape_pixelwise_vae(vae)
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
        "Tiny random LongCat-Video checkpoint made by simpletuner_longcat_video.testing.tiny (not a real model).\n"
    )
    return root


# Output gain of the untrained DiT as a function of sigma: the direction of the velocity a denoiser
# for zero-mean, unit-variance latents predicts flips at sigma 0.5 (towards its input at high noise,
# away from it at low noise); the size is that of the target velocity ``noise - latents``.
_GAIN_SHARPNESS = 16.0
_GAIN_FLIP_SIGMA = 0.5
# How strongly the blocks' adaLN modulation (shift, scale, gate) varies with the timestep.
_MODULATION_STRENGTH = 3.0
# Spread of the blocks' other weights (attention, FFN, cross-attention): small, so the untrained
# model stays close to the plain denoiser, not zero, so frames mix a little as in a real model.
_BLOCK_STD = 0.02


def _velocity_gain(sigma):
    import torch

    return 2**0.5 * torch.tanh(_GAIN_SHARPNESS * (sigma - _GAIN_FLIP_SIGMA))


def shape_trainable_dit(dit, *, seed: int = 0) -> None:
    """Give a fresh DiT weights a LoRA can learn on in minutes: an untrained flow-matching denoiser.

    With the official layers unchanged, the weights are set so that the model without a LoRA
    already does what a pretrained one does for data it knows nothing about:

    * patch embedding and output projection are an orthogonal map and its negative inverse, so
      the output is the (normalised) input: the velocity of pure noise;
    * the final adaLN scale gives that output the size of the target velocity and the direction
      a denoiser for unit-variance latents has at each sigma (``_velocity_gain``), so the model's
      behaviour depends on the timestep as a trained model's does;
    * the timestep embedding is a set of ramps in t (smooth features the adaLN layers read), the
      blocks' modulation varies with t (``_MODULATION_STRENGTH``), their gates start at 1;
    * every norm starts at weight 1 (q/k RMS norms at a random scale would flatten attention
      for good, and LoRA does not train norms); the rest is small random values.

    A LoRA on attention and FFN then only has to learn the data, as on the real model.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden = dit.config.hidden_size
    with torch.no_grad():
        for name, parameter in dit.named_parameters():
            std = _BLOCK_STD if name.startswith("blocks.") else 0.05
            parameter.normal_(0.0, std, generator=generator)
            if "norm" in name:
                parameter.fill_(1.0 if name.endswith("weight") else 0.0)

        embed = dit.x_embedder.proj
        channels, pt, ph, pw = embed.weight.shape[1:]
        patch = channels * pt * ph * pw
        if hidden < patch:
            raise ValueError(f"shape_trainable_dit needs hidden_size >= {patch} (patch values), got {hidden}")
        q, _ = torch.linalg.qr(torch.randn(hidden, patch, generator=generator))
        embed.weight.copy_(q.view_as(embed.weight))
        embed.bias.zero_()
        # The output projection's rows are ordered (pt, ph, pw, channel), the patch embedding's
        # columns (channel, pt, ph, pw): the inverse is q's transpose with its rows reordered.
        inverse = q.T.reshape(channels, pt, ph, pw, hidden).permute(1, 2, 3, 0, 4).reshape(patch, hidden)
        final = dit.final_layer
        final.linear.weight.copy_(-inverse)
        final.linear.bias.zero_()

        embedder = dit.t_embedder
        first, second = embedder.mlp[0], embedder.mlp[2]
        half = embedder.frequency_embedding_size // 2
        # The lowest frequency's sine is a straight line in t over 0..1000: ramps start from it.
        omega = math.exp(-math.log(embedder.max_period) * (half - 1) / half)
        ramps = first.weight.shape[0]
        slope = 8.0
        first.weight.zero_()
        first.weight[:, 2 * half - 1] = slope / math.sin(1000 * omega)
        first.bias.copy_(-slope * torch.linspace(-0.1, 1.1, ramps))
        second.weight.copy_(0.25 * torch.eye(second.weight.shape[0], ramps))
        second.bias.zero_()

        for block in dit.blocks:
            modulation = block.adaLN_modulation[1]
            fan_in = modulation.weight.shape[1]
            modulation.weight.copy_(
                torch.randn(modulation.weight.shape, generator=generator) * _MODULATION_STRENGTH / fan_in**0.5
            )
            modulation.bias.zero_()
            modulation.bias[2 * hidden : 3 * hidden] = 1.0  # gate_msa
            modulation.bias[5 * hidden : 6 * hidden] = 1.0  # gate_mlp

        # Final adaLN: no shift; the scale fitted (ridge least squares on the embedding's
        # features, float64: deterministic) so that 1 + scale(t) follows _velocity_gain.
        t = torch.linspace(0.0, 1000.0, 401)
        features = torch.nn.functional.silu(embedder(t)).double()
        design = torch.cat([features, torch.ones(len(t), 1, dtype=torch.float64)], dim=1)
        wanted = (_velocity_gain(t / 1000.0) - 1.0).double()
        gram = design.T @ design + 1e-6 * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ wanted).float()
        modulation = final.adaLN_modulation[1]
        modulation.weight.zero_()
        modulation.bias.zero_()
        modulation.weight[hidden:] = solution[:-1]
        modulation.bias[hidden:] = solution[-1]


def shape_pixelwise_vae(vae) -> None:
    """Make a fresh tiny ``AutoencoderKLWan`` encode pixel by pixel and frame by frame, nearly deterministically.

    Every convolution keeps only its centre tap (the current frame for the causal time axis),
    the temporal down/up-sampling passes the current frame through, and the posterior's log
    variance is fixed at -14. A uniform frame then gives a uniform latent, the same for a start
    image as for any frame of a clip, and a posterior draw is the mode to about 1 % of the latents'
    spread: what a trained VAE gives the model to learn from, without its spatial mixing (which a
    tiny random VAE makes into position-dependent noise no tiny model can learn in minutes).
    The latent normalisation (``latents_mean``/``latents_std``) is then measured on colours.
    """
    import torch

    with torch.no_grad():
        for name, module in vae.named_modules():
            if not isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
                continue
            if name.endswith((".conv2", ".proj")):
                # Residual branches (resnet second convs, attention outputs) off: the random
                # nonlinear stack would lose most of a colour on the way; the shortcuts carry it.
                module.weight.zero_()
                module.bias.zero_()
                continue
            weight = module.weight
            taps = weight.shape[2:].numel()
            if name.endswith("time_conv"):
                # [out, in, 3, 1, 1]; upsampling convs emit 2 frames' channels: both copy the frame.
                weight.zero_()
                module.bias.zero_()
                out_channels, in_channels = weight.shape[:2]
                for copy in range(out_channels // in_channels):
                    weight[copy * in_channels : (copy + 1) * in_channels, :, -1, 0, 0] = torch.eye(in_channels)
                continue
            if taps == 1:
                continue
            keep = torch.zeros_like(weight)
            if weight.dim() == 5:  # causal in time: the last tap is the current frame
                keep[:, :, -1, weight.shape[3] // 2, weight.shape[4] // 2] = 1.0
            else:
                keep[:, :, weight.shape[2] // 2, weight.shape[3] // 2] = 1.0
            weight.mul_(keep).mul_(taps**0.5)  # the kept tap carries the signal of all of them
        z = vae.config.z_dim
        vae.quant_conv.weight[z:] = 0.0
        vae.quant_conv.bias[z:] = -14.0

        def latent(colour) -> torch.Tensor:
            pixels = torch.tensor(colour, dtype=torch.float32).view(1, 3, 1, 1, 1) / 127.5 - 1.0
            return vae.encode(pixels.expand(1, 3, 1, 64, 64)).latent_dist.mode()[0, :, 0].mean(dim=(1, 2))

        _fit_decoder_output(vae)
        pair = [latent(colour) for colour in LEARNING_COLOURS]
        spread = torch.stack(pair + [latent(colour) for colour in _PALETTE]).std(dim=0)
        # Channel proportions from the palette, overall scale such that the two learning colours
        # land at unit RMS, as normalised latents of a real VAE have unit variance.
        spread = spread * ((pair[0] - pair[1]) / 2 / spread).pow(2).mean().sqrt()
    vae.register_to_config(latents_mean=((pair[0] + pair[1]) / 2).tolist(), latents_std=spread.tolist())


def _fit_decoder_output(vae) -> None:
    # A random decoder squashes its input into nearly one colour. The last convolution (per pixel
    # after shape_pixelwise_vae) is refitted by ridge least squares on random colours so that
    # decode(encode(colour)) is that colour again: validation videos then show what was sampled.
    import torch

    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(256, 3, generator=generator) * 2.0 - 1.0
    pixels = colours.view(-1, 3, 1, 1, 1).expand(-1, 3, 1, 16, 16)
    features = []
    conv_out = vae.decoder.conv_out
    hook = conv_out.register_forward_pre_hook(lambda module, args: features.append(args[0][:, :, -1, 0, 0]))
    try:
        vae.decode(vae.encode(pixels).latent_dist.mode())
    finally:
        hook.remove()
    design = torch.cat([features[-1].double(), torch.ones(len(colours), 1, dtype=torch.float64)], dim=1)
    gram = design.T @ design + 1e-6 * torch.eye(design.shape[1], dtype=torch.float64)
    solution = torch.linalg.solve(gram, design.T @ colours.double()).float()  # [features + 1, 3]
    conv_out.weight.zero_()
    conv_out.weight[:, :, -1, conv_out.weight.shape[3] // 2, conv_out.weight.shape[4] // 2] = solution[:-1].T
    conv_out.bias.copy_(solution[-1])


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

    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel
    from simpletuner_longcat_video.lora.formats import LoraPart, ModuleLora, write_lora_file

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
    """Write ``[T, H, W, 3]`` uint8 frames as a near-lossless H.264 mp4 (PyAV, crf 10)."""
    from simpletuner_longcat_video.core.pipeline import write_video as write_mp4

    return write_mp4(path, frames, fps=fps, crf=10)


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


def build_learning_dataset(root: str | Path, *, frames: int = 9, size: int = 64) -> dict[str, Path]:
    """Two edit-style training pairs a LoRA can learn to reproduce, and a one-pair validation split.

    Pair ``clip_000``: the start frame is the first of ``LEARNING_COLOURS``, the clip the second
    colour throughout; ``clip_001`` the other way round. Both have the same caption, and the VAE's
    latent normalisation is centred between the two colours: which clip to generate can only be
    read from the start frame, and neither the caption nor the average clip gets closer to either
    clip than the untrained model. The validation split repeats the first pair. Same layout and
    return value as :func:`build_tiny_dataset`.
    """
    from PIL import Image

    def filled(colour: tuple[int, int, int], count: int) -> np.ndarray:
        return np.broadcast_to(np.asarray(colour, dtype=np.uint8), (count, size, size, 3)).copy()

    first, second = LEARNING_COLOURS
    splits = {"train": [("clip_000", first, second), ("clip_001", second, first)], "val": [("clip_100", first, second)]}
    root = Path(root)
    folders = {}
    for split, pairs in splits.items():
        clip_dir, frame_dir = root / split / "clips", root / split / "start_frames"
        clip_dir.mkdir(parents=True, exist_ok=True)
        frame_dir.mkdir(parents=True, exist_ok=True)
        for name, start, end in pairs:
            write_video(clip_dir / f"{name}.mp4", filled(end, frames))
            (clip_dir / f"{name}.txt").write_text(LEARNING_CAPTION)
            Image.fromarray(filled(start, 1)[0]).save(frame_dir / f"{name}.png")
        folders[f"{split}_clips"], folders[f"{split}_start_frames"] = clip_dir, frame_dir
    return folders


def build_continuation_dataset(
    root: str | Path, *, clips: int = 2, frames: int = 17, height: int = 64, width: int = 64, offset: int = 200
) -> Path:
    """A video dataset for continuation: ``<root>/clip_<n>.mp4`` + caption each, no start frames; returns ``root``.

    The clips are :func:`synthetic_clip` (a square moving over a gradient), so their later frames
    differ from their first ones; ``offset`` keeps them apart from :func:`build_tiny_dataset`'s clips.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for index in range(offset, offset + clips):
        name = f"clip_{index:03d}"
        write_video(root / f"{name}.mp4", synthetic_clip(index, frames=frames, height=height, width=width))
        words = _WORDS[index % 3], _WORDS[3 + index % 2], _WORDS[6 + index % 4]
        (root / f"{name}.txt").write_text(f"a {words[0]} {words[1]} {words[2]} over the dark background")
    return root


def build_continuation_learning_dataset(
    root: str | Path, *, frames: int = 13, condition_frames: int = 5, size: int = 64
) -> dict[str, Path]:
    """Two clips a continuation LoRA can learn, and a one-clip validation split (``<root>/train``, ``<root>/val``).

    ``clip_000``: its first ``condition_frames`` frames are the first of ``LEARNING_COLOURS``, the
    rest the second colour; ``clip_001`` the other way round; one caption for both. Which colour
    follows can only be read from the condition frames (the latent normalisation is centred
    between the two colours): the continuation counterpart of :func:`build_learning_dataset`.
    Returns the two clip folders by role (``train_clips``, ``val_clips``).
    """
    first, second = LEARNING_COLOURS

    def clip(start: tuple[int, int, int], end: tuple[int, int, int]) -> np.ndarray:
        video = np.empty((frames, size, size, 3), dtype=np.uint8)
        video[:condition_frames] = start
        video[condition_frames:] = end
        return video

    splits = {"train": [("clip_000", first, second), ("clip_001", second, first)], "val": [("clip_100", first, second)]}
    folders = {}
    for split, clips in splits.items():
        folder = Path(root) / split / "clips"
        folder.mkdir(parents=True, exist_ok=True)
        for name, start, end in clips:
            write_video(folder / f"{name}.mp4", clip(start, end))
            (folder / f"{name}.txt").write_text(LEARNING_CAPTION)
        folders[f"{split}_clips"] = folder
    return folders
