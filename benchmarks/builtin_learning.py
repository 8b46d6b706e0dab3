"""Does SimpleTuner's built-in ``longcat_video`` family learn? The demo's learning check, run on the host's own family.

The same job as ``make demo`` (``examples/demo.py``), with the host's built-in family
(``simpletuner/helpers/models/longcat_video/``) instead of this plugin:

1. a tiny random checkpoint in the built-in's layout: ``dit/`` is the built-in's own
   ``LongCatVideoTransformer3DModel`` (the sizes of our tiny DiT, and our tiny DiT's shaped
   weights loaded into it, strict: both follow the official parameter names), ``vae/`` and
   ``scheduler/`` are our tiny ones, the text encoder a tiny random ``Qwen2_5_VLForConditionalGeneration``
   with a word-level tokenizer (``qwen/``, given to the host as ``qwen_text_encoder_model_name_or_path``;
   the DiT's ``caption_channels`` is the real 4096 the host zero-pads every caption to);
2. the demo's paired I2V learning dataset and config (``examples/demo.py``'s ``prepare``), pointed
   at that checkpoint; validation off (the check below replaces it);
3. ``simpletuner train`` with ``SIMPLETUNER_PLUGINS_DISABLE=1`` (our plugin's hook does nothing, the
   log must show the built-in class ran);
4. if a LoRA came out: each training pair sampled image-to-video with the host's
   ``LongCatVideoPipeline`` (built-in transformer, VAE, Qwen encoder, the checkpoint's scheduler),
   without and with the LoRA, same seeds and settings as ``testing/learning.py``; latent MSE to
   the clip's normalised VAE latents on latent frames 1:.

Two rows: ``as-shipped`` (the host unmodified) and ``shim`` (three stated workarounds for the host
problems the first row meets, see ``SHIM``, applied in the training processes through a
``sitecustomize`` module). The learning check itself needs two workarounds in the host's pipeline
call path (see ``learning_check``) in both rows. What the shim row trains is the host's own batch:
SimpleTuner 4.10.1 sets no ``conditioning_latent_count`` for this family (model.py reads it, nothing
writes it), so every frame is noised, and the target is ``noise - latents`` (common.py
``flow_matching_target``) while the family's pipeline negates the DiT's output before each Euler step.

Run it from outside the repository root (the top-level ``kernels/`` folder shadows PyPI's).

    python benchmarks/builtin_learning.py --workdir /tmp/builtin-learning
    python benchmarks/builtin_learning.py --workdir /tmp/builtin-learning --variants shim --steps 6

Results: a markdown table on stdout and ``<workdir>/builtin_learning.json`` (both rows, in full).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "examples"))
import demo  # noqa: E402

# Three workarounds, applied only in the ``shim`` variant, in the training processes (a
# ``sitecustomize`` that patches host modules right after they execute):
# 1. tokenizer: the host passes ``subfolder=None`` to ``AutoTokenizer.from_pretrained`` for the
#    built-in family (common.py ``load_text_tokenizer``; its TEXT_ENCODER_CONFIGURATION has
#    ``tokenizer_subfolder: None``), which transformers 5 turns into ``os.path.join(None, ...)``:
#    None becomes "" (the folder itself);
# 2. pinning: ``collate.fetch_latent`` pins every cached latent, which needs CUDA: without CUDA
#    ``Tensor.pin_memory`` returns the tensor (our plugin does the same for its own family);
# 3. LoRA saving: ``LongCatVideoPipeline`` has no ``save_lora_weights`` (diffusers' base raises
#    NotImplementedError) and the host hands it ``dit_lora_layers`` (``MODEL_SUBFOLDER`` + "_lora_layers",
#    save_hooks.py): the shim writes those PEFT weights, prefixed ``transformer.`` as the pipeline's
#    own ``load_lora_weights`` reads them, to ``pytorch_lora_weights.safetensors``.
SHIM = """\
import json
import os
import sys


def _patch_pipeline(module):
    import transformers

    from_pretrained = transformers.AutoTokenizer.from_pretrained.__func__

    def tokenizer_from_pretrained(cls, *args, **kwargs):
        if "subfolder" in kwargs and kwargs["subfolder"] is None:
            kwargs["subfolder"] = ""
        return from_pretrained(cls, *args, **kwargs)

    transformers.AutoTokenizer.from_pretrained = classmethod(tokenizer_from_pretrained)

    def save_lora_weights(cls, save_directory, dit_lora_layers=None, transformer_lora_layers=None, **kwargs):
        import safetensors.torch

        layers = dit_lora_layers if dit_lora_layers is not None else transformer_lora_layers
        tensors = {f"transformer.{key}": value.contiguous() for key, value in layers.items()}
        metadata = {"format": "pt"}
        for key, value in kwargs.items():
            if key.endswith("lora_adapter_metadata") and value:
                metadata["lora_adapter_metadata"] = json.dumps(value, default=str)
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, kwargs.get("weight_name") or "pytorch_lora_weights.safetensors")
        safetensors.torch.save_file(tensors, path, metadata=metadata)

    module.LongCatVideoPipeline.save_lora_weights = classmethod(save_lora_weights)


def _patch_collate(module):
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


_PATCHES = {
    "simpletuner.helpers.models.longcat_video.pipeline": _patch_pipeline,
    "simpletuner.helpers.training.collate": _patch_collate,
}


from simpletuner_longcat_video._autoload import AfterImport

sys.meta_path.insert(0, AfterImport(_PATCHES))
"""

# Words of the tiny Qwen tokenizer: the learning caption's.
WORDS = ("the", "card", "turns", "into", "other", "colour")
# The built-in pipeline's caption width when it has no transformer (pipeline.py), the real DiT's.
CAPTION_CHANNELS = 4096


def build_checkpoint(workdir: Path) -> Path:
    """The built-in's tiny checkpoint: its DiT class with our tiny DiT's weights, our VAE/scheduler, a tiny Qwen."""
    import torch
    from simpletuner.helpers.models.longcat_video.transformer import LongCatVideoTransformer3DModel as BuiltinDiT
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel as OurDiT
    from simpletuner_longcat_video.testing.tiny import TEXT_DIM, build_tiny_checkpoint

    ours = workdir / "LongCat-Video-tiny"  # demo.prepare builds it; reused for the VAE, scheduler, DiT weights
    if not (ours / "dit").is_dir():
        build_tiny_checkpoint(ours)
    root = workdir / "LongCat-Video-builtin-tiny"
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("vae", "scheduler"):
        shutil.copytree(ours / folder, root / folder)

    source = OurDiT.from_pretrained(ours / "dit")
    keys = ("in_channels", "out_channels", "hidden_size", "depth", "num_heads")
    keys += ("mlp_ratio", "adaln_tembed_dim", "frequency_embedding_size", "patch_size")
    # The host embeds captions through a pipeline without a transformer, so always zero-pads the
    # text to the pipeline's default width (DEFAULT_TRANSFORMER_CAPTION_CHANNELS, the real model's
    # caption_channels). The DiT takes that width; the caption projection reads our tiny DiT's
    # weights on the encoder's TEXT_DIM channels and zeros on the padding: the same function.
    dit = BuiltinDiT(**{key: source.config[key] for key in keys}, caption_channels=CAPTION_CHANNELS)
    weights = source.state_dict()
    name = "y_embedder.y_proj.0.weight"
    weights[name] = torch.nn.functional.pad(weights[name], (0, CAPTION_CHANNELS - weights[name].shape[1]))
    dit.load_state_dict(weights, strict=True)
    dit.save_pretrained(root / "dit")

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, **{word: index + 3 for index, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    tokenizer.save_pretrained(root / "qwen")
    torch.manual_seed(0)
    text = {"vocab_size": 64, "hidden_size": TEXT_DIM, "intermediate_size": 64, "num_hidden_layers": 2}
    text |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}
    text |= {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2}
    text |= {"rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}}
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": TEXT_DIM}
    vision |= {"fullatt_block_indexes": [0]}
    ids = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 2}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    encoder = Qwen2_5_VLForConditionalGeneration(config)
    encoder.save_pretrained(root / "qwen")
    return root


def prepare(workdir: Path, steps: int) -> tuple[Path, Path]:
    """The demo's learning config and dataset, pointed at the built-in's checkpoint; returns (config, checkpoint)."""
    config_path = demo.prepare(workdir, learning=True)
    checkpoint = build_checkpoint(workdir)
    config = json.loads(config_path.read_text())
    config.update(
        pretrained_model_name_or_path=str(checkpoint),
        qwen_text_encoder_model_name_or_path=str(checkpoint / "qwen"),
        aspect_bucket_alignment=64,  # the built-in forces 64 (model.py __init__)
        max_train_steps=steps,
        checkpoint_step_interval=steps,
        validation_disable=True,
    )
    config.pop("eval_dataset_id", None)
    # Our plugin's own option (the host's argument parser has none without the plugin).
    config.pop("attention_implementation", None)
    config_path.write_text(json.dumps(config, indent=2))
    datasets = json.loads((workdir / "config" / "multidatabackend.json").read_text())
    datasets = [entry for entry in datasets if entry["id"] not in ("longcat-video-val", "longcat-video-val-cond")]
    (workdir / "config" / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    return config_path, checkpoint


def train(workdir: Path, log_path: Path, shim: bool) -> int:
    command, env = demo.host_command(workdir)
    env.update(SIMPLETUNER_PLUGINS_DISABLE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if shim:
        shim_dir = workdir / "shim"
        shim_dir.mkdir(exist_ok=True)
        (shim_dir / "sitecustomize.py").write_text(SHIM)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim_dir), env.get("PYTHONPATH")]))
    with log_path.open("w") as log:
        return subprocess.run(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode


def failure(log_text: str) -> dict | None:
    """The training process's error: its last traceback (not accelerate's relaunch one) or an argparse error.

    Returns the final error line, the innermost frame inside the host's package and where it was raised.
    """
    log_text = re.sub(r"\x1b\[[0-9;]*m", "", log_text)  # the host's coloured log lines
    marker = "Traceback (most recent call last)"
    blocks = [marker + block for block in log_text.split(marker)[1:]]
    blocks = [block for block in blocks if "accelerate/commands/launch.py" not in block]
    if not blocks:
        usage = re.findall(r"^.*train\.py: error: .*$", log_text, flags=re.M)
        return {"error": usage[-1].strip(), "host_frame": None, "raised_at": None} if usage else None
    tail = blocks[-1].splitlines()
    frames = [
        (match.group(1), int(match.group(2)), match.group(3))
        for line in tail
        if (match := re.match(r'\s*File "([^"]+)", line (\d+), in (\S+)', line))
    ]
    error = next((line.strip() for line in tail[1:] if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", line)), "")
    host = [frame for frame in frames if "/site-packages/simpletuner/" in frame[0]]

    def short(frame):
        return None if frame is None else f"{frame[0].split('site-packages/')[-1]}:{frame[1]} ({frame[2]})"

    return {
        "error": error,
        "host_frame": short(host[-1] if host else None),
        "raised_at": short(frames[-1] if frames else None),
        "traceback": "\n".join(tail[-40:]),
    }


def built_in_ran(log_text: str) -> bool:
    """The built-in family, not ours: the plugin's take-over notice absent, the built-in's Qwen tokenizer loaded."""
    return "replaces the built-in" not in log_text and "Loading tokenizer 1: AutoTokenizer" in log_text


def learning_check(checkpoint: Path, lora: Path, pairs) -> tuple[list[float], list[float]]:
    """Latent MSE per pair, without and with the LoRA, sampled by the host's own pipeline."""
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
    from PIL import Image
    from simpletuner.helpers.models.longcat_video.pipeline import LongCatVideoPipeline
    from simpletuner.helpers.models.longcat_video.transformer import LongCatVideoTransformer3DModel
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from simpletuner_longcat_video.testing import learning

    pipe = LongCatVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint / "scheduler"),
        vae=AutoencoderKLWan.from_pretrained(checkpoint / "vae"),
        text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint / "qwen"),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint / "qwen"),
        transformer=LongCatVideoTransformer3DModel.from_pretrained(checkpoint / "dit"),
    )
    pipe.set_progress_bar_config(disable=True)
    # The pipeline adds the frame axis to a start image twice (__call__ unsqueeze(2) after
    # preprocess, prepare_latents unsqueeze(2) again): the VAE gets [1, C, 1, 1, H, W] and fails.
    # The check's first workaround: that extra axis is dropped before the VAE encodes.
    encode = pipe.vae.encode

    def encode_5d(pixels, *args, **kwargs):
        if pixels.dim() == 6 and pixels.shape[2] == 1:
            pixels = pixels.squeeze(2)
        return encode(pixels, *args, **kwargs)

    pipe.vae.encode = encode_5d
    # The pipeline hands the transformer prompt embeddings [B, 1, S, C] (encode_prompt's shape)
    # where its forward flattens [B, S, C] (training squeezes that axis in model.py): the check's
    # second workaround drops the singleton axis on the way in.
    forward = pipe.transformer.forward

    def forward_3d(*args, encoder_hidden_states=None, **kwargs):
        if encoder_hidden_states is not None and encoder_hidden_states.dim() == 4:
            encoder_hidden_states = encoder_hidden_states.squeeze(1)
        return forward(*args, encoder_hidden_states=encoder_hidden_states, **kwargs)

    pipe.transformer.forward = forward_3d

    @torch.no_grad()
    def errors() -> list[float]:
        result = []
        for pair in pairs:
            frames = learning.read_clip(pair.clip)
            width, height = frames[0].size
            pixels = pipe.video_processor.preprocess_video(frames, height=height, width=width)
            target = pipe._normalize_latents(
                pipe.vae.encode(pixels).latent_dist.mode().float(), device=pixels.device, dtype=torch.float32
            )
            start = Image.open(pair.start_frame).convert("RGB")
            per_seed = []
            for seed in learning.SEEDS:
                sampled = pipe(
                    prompt=pair.caption,
                    image=start,
                    height=height,
                    width=width,
                    num_frames=len(frames),
                    num_inference_steps=learning.STEPS,
                    guidance_scale=learning.GUIDANCE,
                    generator=torch.Generator().manual_seed(seed),
                    output_type="latent",
                ).videos
                per_seed.append(float(((sampled[:, :, 1:].float() - target[:, :, 1:]) ** 2).mean()))
            result.append(sum(per_seed) / len(per_seed))
        return result

    before = errors()
    pipe.load_lora_weights(str(lora))
    after = errors()
    return before, after


VARIANTS = {"as-shipped": False, "shim": True}


def run_variant(workdir: Path, steps: int, shim: bool) -> dict:
    """One ``simpletuner train`` of the built-in family in ``workdir`` and, if it wrote a LoRA, the learning check."""
    start = time.monotonic()
    _, checkpoint = prepare(workdir, steps)
    log_path = workdir / "train.log"
    code = train(workdir, log_path, shim)
    trained = time.monotonic()
    log_text = log_path.read_text(errors="replace")
    summary = demo.summarise(workdir, log_text)
    losses = summary["losses"]
    row = {
        "family": "built-in simpletuner.helpers.models.longcat_video",
        "shim": shim,
        "built_in_ran": built_in_ran(log_text),
        "exit_code": code,
        "steps": len(losses),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "lora": str(summary["lora"]) if summary["lora"] else None,
        "failure": failure(log_text) if code != 0 or not summary["lora"] else None,
        "missing_conditioning_warnings": len(re.findall(r"Missing \d+ conditioning samples", log_text)),
        "train_s": round(trained - start, 1),
        "log": str(log_path),
    }
    if summary["lora"] is not None:
        from simpletuner_longcat_video.testing.learning import training_pairs

        train_dir = workdir / "datasets" / "longcat-video" / "train"
        pairs = training_pairs(train_dir / "clips", train_dir / "start_frames")
        try:
            before, after = learning_check(checkpoint, summary["lora"], pairs)
            row.update(mse_without=sum(before) / len(before), mse_with=sum(after) / len(after))
            row.update(per_pair_without=before, per_pair_with=after)
            row["ratio"] = row["mse_without"] / max(row["mse_with"], 1e-12)
        except Exception as exc:  # the check's own failure is a result too
            import traceback

            row["check_failure"] = f"{type(exc).__name__}: {exc}"
            row["check_traceback"] = traceback.format_exc()
    row["total_s"] = round(time.monotonic() - start, 1)
    return row


def table_row(name: str, row: dict) -> str:
    ran = f"simpletuner train, built-in class ran: {'yes' if row['built_in_ran'] else 'NO'}, exit {row['exit_code']}"
    ran += ", workarounds 1-3 (SHIM)" if row["shim"] else ", host unmodified"
    loss = f"{row['loss_first']:.3f} -> {row['loss_last']:.3f}" if row["steps"] else "-"
    if "ratio" in row:
        outcome = f"{row['mse_without']:.4f} | {row['mse_with']:.4f} | {row['ratio']:.2f}x"
    else:
        cause = row["failure"] or {"error": row.get("check_failure", "no LoRA written")}
        where = f" at {cause['host_frame']} (raised {cause['raised_at']})" if cause.get("host_frame") else ""
        outcome = f"- | - | failed: `{cause['error']}`{where}"
    return f"| built-in ({name}) | {ran} | {row['steps']} | {loss} | {outcome} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/builtin-learning"), help="everything goes here")
    parser.add_argument("--steps", type=int, default=demo.LEARNING_OVERRIDES["max_train_steps"])
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {sorted(VARIANTS)}")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)

    rows = {}
    for name in args.variants.split(","):
        rows[name] = run_variant(workdir / name, args.steps, VARIANTS[name])
        (workdir / "builtin_learning.json").write_text(json.dumps(rows, indent=2))
    print("| row | what ran | steps | loss first -> last | latent MSE without LoRA | with LoRA | ratio / failure |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        print(table_row(name, row))
    times = ", ".join(f"{name} {row['total_s']:.1f} s" for name, row in rows.items())
    print(f"time: {times}; json: {workdir / 'builtin_learning.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
