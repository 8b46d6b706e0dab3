"""The family's facts, declared once.

Everything the plugin states about LongCat-Video (names, flavours, checkpoint layout, frame and
bucket rules, sampling defaults) lives here as plain data. The host-facing family class, the
plugin registration and ``plugin_manifest.toml`` all read or are checked against this module, so
it must stay free of heavy imports (the standard library and ``errors`` only). The two shape rules
every layer applies (:func:`check_frames`, :func:`check_size`) live here with the facts they test.
"""

from __future__ import annotations

from dataclasses import dataclass

from simpletuner_longcat_video.errors import LongCatVideoError

FAMILY = "longcat_video"
DISPLAY_NAME = "LongCat-Video"
DESCRIPTION = (
    "LongCat-Video flow-matching transformer for image-to-video, video continuation and text-to-video, as a plugin"
)
# What one checkpoint and one LoRA training run can do (the host's model API has no field for these:
# the WebUI shows DESCRIPTION; plugin_manifest.toml lists them).
TASKS = ("text-to-video", "image-to-video", "video-continuation")
FLAVOURS: dict[str, str] = {"final": "meituan-longcat/LongCat-Video"}
DEFAULT_FLAVOUR = "final"
PREDICTION_TYPE = "flow_matching"
DISTRIBUTION = "simpletuner-longcat-video"
# The entry points pyproject.toml declares (tests/test_manifest.py checks it and the manifest against these).
FAMILY_CLASS = "simpletuner_longcat_video.host.family:LongCatVideo"
ATTENTION_BACKENDS: dict[str, str] = {"block_sparse": "simpletuner_longcat_video.core.attention_bsa:BACKEND"}

# Official checkpoint layout (HF repo meituan-longcat/LongCat-Video).
DIT_SUBFOLDER = "dit"
VAE_SUBFOLDER = "vae"
TEXT_ENCODER_SUBFOLDER = "text_encoder"
TOKENIZER_SUBFOLDER = "tokenizer"
SCHEDULER_SUBFOLDER = "scheduler"
TEXT_ENCODER_CLASS = "UMT5EncoderModel"
TEXT_ENCODER_NAME = "umT5-XXL"
TEXT_MAX_TOKENS = 512

# Latent geometry: Wan 2.1 VAE, 8x spatial and 4x temporal compression, patch (1, 2, 2).
LATENT_CHANNELS = 16
VAE_SPATIAL_COMPRESSION = 8
VAE_TEMPORAL_COMPRESSION = 4
NUM_BLOCKS = 48
NUM_HEADS = 32

# meituan-longcat/LongCat-Video's dit/config.json, as published: the architecture values and
# upstream's run-time switches (which core.transformer accepts on load and drops). Used where a
# full-size or official-layout checkpoint is built (benchmarks, tests); text_tokens_zero_pad=true is
# what copies of the published file show, bsa_params an example.
OFFICIAL_DIT_CONFIG: dict = {
    "in_channels": 16,
    "out_channels": 16,
    "hidden_size": 4096,
    "depth": NUM_BLOCKS,
    "num_heads": NUM_HEADS,
    "caption_channels": 4096,
    "mlp_ratio": 4,
    "adaln_tembed_dim": 512,
    "frequency_embedding_size": 256,
    "patch_size": [1, 2, 2],
    "enable_flashattn3": False,
    "enable_flashattn2": True,
    "enable_xformers": False,
    "enable_bsa": False,
    "bsa_params": {
        "sparsity": 0.9375,
        "cdf_threshold": None,
        "chunk_3d_shape_q": [4, 4, 4],
        "chunk_3d_shape_k": [4, 4, 4],
    },
    "cp_split_hw": [1, 1],
    "text_tokens_zero_pad": True,
}

# Data rules. Every edge must divide by 16 (VAE 8x, patch 2). Bucket grids the host offers that
# keep that: 16, 32, 64. The default is 16: LongCat-Video's 480p is 832x480 and 480 is not a
# multiple of 64 (on the 64 px grid a 832x480 clip becomes 832x512).
SIZE_MULTIPLE = 16
BUCKET_ALIGNMENTS = (16, 32, 64)
BUCKET_ALIGNMENT = 16
DEFAULT_NUM_FRAMES = 93
DEFAULT_RESOLUTION = (480, 832)  # height, width

# Sampling defaults.
FLOW_SHIFT = 12.0
DEFAULT_GUIDANCE = 4.0
DEFAULT_STEPS = 40
DEFAULT_FRAMERATE = 15  # upstream's demos write their videos at 15 fps
NUM_COND_LATENTS_I2V = 1

# Video continuation: a video dataset marked with this key (K pixel frames, K = 4k + 1) trains with
# its clip's own first (K - 1) / 4 + 1 latent frames as the condition. The Wan VAE is causal in
# time, so those latent frames of the whole clip's encode are the encode of its first K frames
# alone: what the pipeline encodes when it continues a clip from K frames.
CONDITION_FRAMES_KEY = "longcat_condition_frames"

# The official CFG + step distillation LoRA (lora/cfg_step_lora.safetensors) samples with these.
DISTILL_LORA_FILE = "lora/cfg_step_lora.safetensors"
DISTILL_STEPS = 16
DISTILL_GUIDANCE = 1.0
DISTILL_GRID_STEPS = 50  # the distillation's sigma grid (upstream num_distill_sample_steps)

# Video continuation sampling: upstream's generate_vc conditions on 13 pixel frames (4 latent frames).
DEFAULT_CONDITION_FRAMES = 13


@dataclass(frozen=True)
class FrameRule:
    """Frame counts the Wan VAE can encode without dropping frames: (frames - 1) % 4 == 0."""

    temporal_compression: int = VAE_TEMPORAL_COMPRESSION

    def is_valid(self, frames: int) -> bool:
        return frames >= 1 and (frames - 1) % self.temporal_compression == 0

    def nearest_valid_below(self, frames: int) -> int:
        """Largest valid count not above ``frames`` (trimming never invents frames)."""
        if frames < 1:
            raise ValueError(f"frame count must be >= 1, got {frames}")
        return ((frames - 1) // self.temporal_compression) * self.temporal_compression + 1

    def latent_frames(self, frames: int) -> int:
        return (frames - 1) // self.temporal_compression + 1


FRAME_RULE = FrameRule()


def whole_number(value: object) -> int | None:
    """``value`` as an int if it is a whole number (int, integral float or digit string), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    text = str(value).strip()
    return int(text) if text.isdecimal() else None


def check_frames(value: object, where: str) -> int:
    """``value`` as a frame count the VAE encodes whole: a positive whole number with (frames - 1) % 4 == 0."""
    frames = whole_number(value)
    if frames is None or frames < 1:
        raise LongCatVideoError(where=where, value=value, rule="must be a positive whole number", fix="use e.g. 93")
    if not FRAME_RULE.is_valid(frames):
        below = FRAME_RULE.nearest_valid_below(frames)
        raise LongCatVideoError(
            where=where,
            value=frames,
            rule="LongCat-Video needs (frames - 1) % 4 == 0 (the VAE keeps frame 1 and compresses the rest 4x)",
            fix=f"use {below} or {below + 4}",
        )
    return frames


def check_condition_frames(value: object, num_frames: int | None, where: str) -> int:
    """``value`` as a count of leading pixel frames that condition a video: 4k+1, below ``num_frames``.

    K pixel frames encode to (K - 1) / 4 + 1 latent frames, so K follows the frame rule; at least one
    latent frame must be left to generate, so K < ``num_frames`` (when given).
    """
    frames = check_frames(value, where)
    if num_frames is not None and frames >= num_frames:
        most = FRAME_RULE.nearest_valid_below(num_frames - 1) if num_frames > 1 else None
        raise LongCatVideoError(
            where=where,
            value=frames,
            rule=f"condition frames must be fewer than the {num_frames} frames of the video (some frames must be "
            "generated)",
            fix=(f"use at most {most} condition frames, or " if most else "use ") + f"more than {frames} frames",
        )
    return frames


def check_size(width: int, height: int, where: str, value: object = None) -> None:
    """Width and height must be positive and divisible by 16 (VAE 8x, patch 2)."""
    if width <= 0 or height <= 0 or width % SIZE_MULTIPLE or height % SIZE_MULTIPLE:
        grid = BUCKET_ALIGNMENT
        suggestion = f"{max(grid, round(width / grid) * grid)}x{max(grid, round(height / grid) * grid)}"
        raise LongCatVideoError(
            where=where,
            value=f"{width}x{height}" if value is None else value,
            rule=f"{width}x{height}: width and height must be divisible by {SIZE_MULTIPLE} (VAE 8x, patch 2)",
            fix=f"use e.g. {suggestion} (WIDTHxHEIGHT on the {grid} px grid the buckets use)",
        )


def host_requirement() -> str | None:
    """The supported host range as declared in the installed package metadata (one place: pyproject)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("simpletuner-longcat-video") or []
    except PackageNotFoundError:
        return None
    for req in reqs:
        name = req.split(";")[0].strip()
        if name.lower().startswith("simpletuner") and not name.lower().startswith("simpletuner-"):
            return name
    return None


@dataclass(frozen=True)
class ConfigOption:
    """A config key the plugin adds to the host (its CLI parser refuses keys it does not know).

    ``label`` and ``tab`` place the key in the host's WebUI: the tab's "model-specific" or
    "validation options" section, shown for this family only (``fields.register_fields``).
    """

    name: str
    type: type
    default: object
    help: str
    choices: tuple[str, ...] | None = None
    label: str = ""
    tab: str = "model"


ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "xformers", "block_sparse")
# What each gradient-checkpointed DiT block keeps from its forward (core/selective_checkpoint.py says
# what each level stores); "auto" is resolved by host/settings.py (checkpoint_saves_from_config).
CHECKPOINT_SAVES = ("auto", "none", "attention", "attention+proj", "attention+ffn")
CONFIG_OPTIONS = (
    ConfigOption(
        "attention_implementation",
        str,
        "auto",
        "LongCat-Video self-attention: auto (block-sparse Triton kernel on CUDA when it compiles and the clip has "
        "more than one latent frame, else SDPA), sdpa, xformers (forces xFormers) or block_sparse",
        ATTENTION_IMPLEMENTATIONS,
        label="LongCat-Video Attention",
        tab="model",
    ),
    ConfigOption(
        "longcat_bsa_sparsity",
        float,
        0.875,
        "LongCat-Video block-sparse attention: fraction of key blocks dropped per query block, in [0, 1] (one is always kept)",
        label="LongCat-Video Block-Sparse Sparsity",
        tab="model",
    ),
    ConfigOption(
        "longcat_bsa_chunk",
        str,
        "4,4,8",
        "LongCat-Video block-sparse attention: token chunk T,H,W (volume a power of two from 16 to 256)",
        label="LongCat-Video Block-Sparse Chunk (T,H,W)",
        tab="model",
    ),
    ConfigOption(
        "longcat_bsa_cdf_threshold",
        float,
        None,
        "LongCat-Video block-sparse attention: also keep the smallest set of key blocks whose softmax mass "
        "reaches this value, in (0, 1]; unset = top-k by sparsity only",
        label="LongCat-Video Block-Sparse CDF Threshold",
        tab="model",
    ),
    ConfigOption(
        "longcat_compile_blocks",
        str,
        "auto",
        "LongCat-Video: torch.compile each DiT block (auto/true/false). auto compiles on CUDA with a bf16 base, "
        "no block swap and no context parallelism (the measured setting: 10.88 -> 7.54 s per 480x832x93 LoRA "
        "step with block-sparse attention on an H200, docs/memory.md); the first step pays the compile "
        "(about 30 s there), logged",
        ("auto", "true", "false"),
        label="LongCat-Video Compile DiT Blocks",
        tab="model",
    ),
    ConfigOption(
        "longcat_checkpoint_saves",
        str,
        "auto",
        "LongCat-Video gradient checkpointing: what each checkpointed block keeps instead of recomputing it in "
        "the backward: none (recompute all), attention (self-attention output and log-sum-exp), attention+proj "
        "(also the hidden-wide projection outputs), attention+ffn (also the FFN matmul outputs); auto = attention, "
        "or none with quantisation, block swap, the unsloth offload or xFormers (docs/memory.md: which for your GPU)",
        CHECKPOINT_SAVES,
        label="LongCat-Video Checkpoint Saves",
        tab="model",
    ),
    ConfigOption(
        CONDITION_FRAMES_KEY,
        int,
        None,
        "LongCat-Video video continuation for every video dataset without start frames: the clip's own first K "
        "frames (K = 1, 5, 9, 13, ...; upstream uses 13) are the condition, clean and outside the loss; a video "
        "dataset's own longcat_condition_frames wins (0 turns it off there); unset = no continuation",
        label="LongCat-Video Continuation Condition Frames",
        tab="model",
    ),
    ConfigOption(
        "longcat_validation_distill_lora",
        str,
        None,
        "LongCat-Video validation previews: path of the official distillation LoRA "
        f"(<checkpoint>/{DISTILL_LORA_FILE}); when set, previews apply it on top of the trained LoRA and "
        f"sample with {DISTILL_STEPS} steps and guidance {DISTILL_GUIDANCE} (training weights are untouched)",
        label="LongCat-Video Preview Distillation LoRA",
        tab="validation",
    ),
)
