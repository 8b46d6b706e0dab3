"""Convert a LongCat-Video LoRA between our (peft), the upstream and the ComfyUI formats.

    python -m simpletuner_longcat_video.lora.export IN.safetensors --format upstream -o OUT.safetensors

The input format is recognised from its keys. ``--check-against`` loads a ``dit/`` folder (or a
checkpoint root holding one) and refuses a LoRA whose modules or shapes do not fit it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.lora import formats


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simpletuner_longcat_video.lora.export",
        description="Convert a LongCat-Video LoRA to the upstream LongCat-Video format, the ComfyUI "
        "(kijai WanVideoWrapper) format, or back to ours (peft/diffusers). See docs/lora.md.",
    )
    parser.add_argument("input", type=Path, help="LoRA .safetensors (format detected from its keys)")
    parser.add_argument("--format", required=True, choices=formats.FORMATS, help="format to write")
    parser.add_argument("-o", "--output", required=True, type=Path, help="where to write the converted file")
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="lora_alpha of a peft input that carries no adapter metadata (SimpleTuner's final "
        "pytorch_lora_weights.safetensors before this plugin added it); default: the rank (scale 1)",
    )
    parser.add_argument(
        "--check-against",
        type=Path,
        default=None,
        help="a LongCat-Video checkpoint (root or its dit/ folder): refuse a LoRA that does not fit it",
    )
    return parser


def _check_against(layers: formats.LoraLayers, checkpoint: Path, source: str) -> None:
    import torch

    from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel

    folder = checkpoint / "dit" if (checkpoint / "dit").is_dir() else checkpoint
    if not (folder / "config.json").is_file():
        raise LongCatVideoError(
            where="--check-against",
            value=str(checkpoint),
            rule="needs a LongCat-Video checkpoint root or its dit/ folder (with config.json)",
            fix="point it at the folder you pass as pretrained_model_name_or_path",
        )
    # The config alone gives every layer's shape; no weights need to be read.
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel.from_config(LongCatVideoTransformer3DModel.load_config(folder))
    formats.check_against(model, layers, source=source)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    source = str(args.input)
    try:
        layers, found = formats.read_lora_file(args.input, alpha=args.alpha)
        if args.check_against is not None:
            _check_against(layers, args.check_against, source)
        if args.output.resolve() == args.input.resolve():
            raise LongCatVideoError(
                where="-o/--output",
                value=str(args.output),
                rule="the output would overwrite the input",
                fix="write to another file",
            )
        written = formats.write_lora_file(layers, args.output, args.format, source=source)
    except LongCatVideoError as exc:
        print(f"export_lora: error: {exc}", file=sys.stderr)
        return 2
    print(f"read {source} ({found} format): {formats.describe(layers)}")
    print(f"wrote {args.output} ({args.format} format): {len(written)} tensors")
    if found == "peft" and args.alpha is None and not _has_metadata(args.input):
        print(
            "note: the input has no adapter metadata, so lora_alpha = rank (scale 1) was assumed; pass --alpha if not"
        )
    if args.format == "upstream":
        rank = next(
            t.shape[1] for k, t in written.items() if k.endswith((".lora_up.weight", ".lora_up.blocks.0.weight"))
        )
        print(
            f"upstream: dit.load_lora(path, key, lora_network_dim={rank}) then dit.enable_loras([key]) "
            "(alpha_scale is read from the file)"
        )
    return 0


def _has_metadata(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return formats.adapter_metadata(handle.metadata()) is not None


if __name__ == "__main__":
    sys.exit(main())
