"""LoRA files in three formats, one in-memory form, and two ways to apply them to our DiT.

Formats (facts and sources in ``docs/lora.md``):

``peft``
    What SimpleTuner saves through our pipeline (diffusers/peft): ``transformer.<module>.lora_A.weight``
    ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``; the scale ``lora_alpha / r`` (``/ sqrt(r)`` with
    rsLoRA) comes from the ``lora_adapter_metadata`` JSON in the safetensors header, when present.
``upstream``
    LongCat-Video's ``load_lora`` (``longcat_video/modules/lora_utils.py``), the format of the official
    ``lora/cfg_step_lora.safetensors``: ``lora___lorahyphen___<module, dots as ___lorahyphen___>`` +
    ``.lora_down.weight`` ``[n*r, in]``, ``.lora_up.weight`` ``[out, r]`` or, for fused projections,
    ``.lora_up.blocks.<i>.weight`` ``[out/n, r]`` (block ``i`` maps the ``i``-th ``r`` rows of the down
    output to the ``i``-th slice of the output), and ``.alpha_scale`` (the scale itself, a scalar).
``comfyui``
    kijai's ComfyUI-WanVideoWrapper, which runs LongCat-Video as a Wan-style model with split
    projections: ``diffusion_model.<wan module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
    (scale ``alpha / rank``; no alpha means scale 1).

In memory a LoRA is ``{module path in our transformer: ModuleLora}``; a :class:`ModuleLora` is a list
of :class:`LoraPart` that cover consecutive row blocks of the module's output, each with its own
down/up matrices and scale. One part is an ordinary LoRA; several parts are upstream's fused-projection
layout or a ComfyUI q/k/v trio. Every format converts to and from this form without touching a
number: tensors are sliced or concatenated, never recomputed, so a round trip gives back the same
tensors and the same merged weights.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from simpletuner_longcat_video.errors import LongCatVideoError

FORMATS = ("peft", "upstream", "comfyui")

PEFT_PREFIX = "transformer."
UPSTREAM_PREFIX = "lora___lorahyphen___"
UPSTREAM_DOT = "___lorahyphen___"
COMFY_PREFIX = "diffusion_model."
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header key

# Our module (official checkpoint name) -> the Wan-style modules kijai's wrapper splits it into,
# in output-row order; the rows are split evenly between them. "{i}" is the block index.
COMFY_MODULES: dict[str, tuple[str, ...]] = {
    "blocks.{i}.attn.qkv": ("blocks.{i}.self_attn.q", "blocks.{i}.self_attn.k", "blocks.{i}.self_attn.v"),
    "blocks.{i}.attn.proj": ("blocks.{i}.self_attn.o",),
    "blocks.{i}.cross_attn.q_linear": ("blocks.{i}.cross_attn.q",),
    "blocks.{i}.cross_attn.kv_linear": ("blocks.{i}.cross_attn.k", "blocks.{i}.cross_attn.v"),
    "blocks.{i}.cross_attn.proj": ("blocks.{i}.cross_attn.o",),
    "blocks.{i}.ffn.w1": ("blocks.{i}.ffn.w1",),
    "blocks.{i}.ffn.w2": ("blocks.{i}.ffn.w2",),
    "blocks.{i}.ffn.w3": ("blocks.{i}.ffn.w3",),
    "blocks.{i}.adaLN_modulation.1": ("blocks.{i}.modulation.1",),
    "final_layer.linear": ("head.head",),
    "final_layer.adaLN_modulation.1": ("head.modulation.1",),
}


@dataclass(frozen=True)
class LoraPart:
    """``scale * up @ down`` for one row block of a module's output (``up [rows, r]``, ``down [r, in]``)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class ModuleLora:
    """The LoRA of one linear layer: parts covering its output rows in order."""

    parts: tuple[LoraPart, ...]

    @property
    def in_features(self) -> int:
        return int(self.parts[0].down.shape[1])

    @property
    def out_features(self) -> int:
        return sum(int(part.up.shape[0]) for part in self.parts)

    def delta(self) -> torch.Tensor:
        """The weight change ``[out, in]`` in float32: each part's ``up @ down`` times its scale, stacked."""
        return torch.cat([(part.up.float() @ part.down.float()) * part.scale for part in self.parts], dim=0)


LoraLayers = dict[str, ModuleLora]


# --------------------------------------------------------------------------------------------- errors


def _bad_file(source: str, keys: Iterable[object], rule: str, fix: str) -> LongCatVideoError:
    keys = list(keys)
    shown = keys[:3] + ([f"... {len(keys) - 3} more"] if len(keys) > 3 else [])
    return LongCatVideoError(where=f"LoRA file {source}", value=shown, rule=rule, fix=fix)


# ------------------------------------------------------------------------------------ part arithmetic


def _fuse(parts: tuple[LoraPart, ...], *, source: str, module: str) -> LoraPart:
    """Several row parts as one LoRA: downs stacked, ups block-diagonal (exact; needs one scale)."""
    if len(parts) == 1:
        return parts[0]
    scales = sorted({part.scale for part in parts})
    if len(scales) > 1:
        raise _bad_file(
            source,
            [module],
            f"its row parts have different scales {scales}, and the target format keeps one scale per module",
            "give the split projections (e.g. q, k and v) one alpha per rank before converting",
        )
    dtype = parts[0].down.dtype
    down = torch.cat([part.down.to(dtype) for part in parts], dim=0)
    up = torch.zeros(sum(p.up.shape[0] for p in parts), down.shape[0], dtype=dtype, device=down.device)
    row = col = 0
    for part in parts:
        up[row : row + part.up.shape[0], col : col + part.rank] = part.up.to(dtype)
        row, col = row + part.up.shape[0], col + part.rank
    return LoraPart(down=down, up=up, scale=scales[0])


def _joined(parts: list[LoraPart]) -> ModuleLora:
    """Parts sharing one down matrix and scale are one LoRA split by rows: join them back (exact)."""
    first = parts[0]
    same = all(
        p.scale == first.scale and p.down.shape == first.down.shape and torch.equal(p.down, first.down)
        for p in parts[1:]
    )
    if len(parts) > 1 and same:
        return ModuleLora((LoraPart(down=first.down, up=torch.cat([p.up for p in parts], dim=0), scale=first.scale),))
    return ModuleLora(tuple(parts))


def _rows(lora: ModuleLora, start: int, stop: int, *, source: str, module: str) -> LoraPart:
    """The LoRA of output rows ``[start, stop)``: a slice of one part, or whole parts fused."""
    inside, offset = [], 0
    for part in lora.parts:
        end = offset + part.up.shape[0]
        if offset <= start and stop <= end:
            return LoraPart(down=part.down, up=part.up[start - offset : stop - offset], scale=part.scale)
        if start <= offset and end <= stop:
            inside.append(part)
        elif offset < stop and start < end:
            raise _bad_file(
                source,
                [module],
                f"a row part [{offset}, {end}) straddles the split at rows [{start}, {stop})",
                "convert from the trained LoRA or the official file directly",
            )
        offset = end
    return _fuse(tuple(inside), source=source, module=module)


# ------------------------------------------------------------------------------------------- peft


def _peft_scale(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _pattern_value(patterns: dict, module: str, default: object) -> object:
    # peft's own rule (peft.utils.other.get_pattern_key): a pattern matches a trailing part of the name.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def adapter_metadata(header: dict[str, str] | None) -> dict | None:
    """The peft config diffusers stores in a safetensors header (keys prefixed ``transformer.``)."""
    raw = (header or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    packed = json.loads(raw)
    prefixed = {k[len(PEFT_PREFIX) :]: v for k, v in packed.items() if k.startswith(PEFT_PREFIX)}
    return prefixed or packed


def from_peft(
    state_dict: dict[str, torch.Tensor], metadata: dict | None = None, *, alpha: float | None = None, source: str = "?"
) -> LoraLayers:
    """Our trained LoRA. The scale comes from ``metadata`` (peft config); without it from ``alpha``,
    else ``lora_alpha = r`` (scale 1), which is what diffusers assumes when it loads such a file."""
    metadata = metadata or {}
    if metadata.get("use_dora"):
        raise _bad_file(
            source,
            ["use_dora"],
            "a DoRA adapter has a magnitude vector that no LoRA format here can carry",
            "train with use_dora off to export",
        )
    rslora = bool(metadata.get("use_rslora", False))
    base_alpha = alpha if alpha is not None else metadata.get("lora_alpha")
    alpha_pattern = {} if alpha is not None else (metadata.get("alpha_pattern") or {})
    names = {key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key: key for key in state_dict}
    unknown = [names[k] for k in names if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if unknown:
        raise _bad_file(
            source,
            unknown,
            "a peft LoRA file holds only <module>.lora_A.weight and <module>.lora_B.weight tensors",
            "export the LoRA SimpleTuner saved (pytorch_lora_weights.safetensors), not another adapter type",
        )
    layers: LoraLayers = {}
    modules = sorted({k.rsplit(".", 2)[0] for k in names})
    for module in modules:
        a_key, b_key = names.get(f"{module}.lora_A.weight"), names.get(f"{module}.lora_B.weight")
        if a_key is None or b_key is None:
            raise _bad_file(
                source,
                [a_key or b_key],
                f"module {module} has only one of lora_A / lora_B",
                "use the complete file the trainer wrote",
            )
        down, up = state_dict[a_key], state_dict[b_key]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise _bad_file(
                source,
                [a_key, b_key],
                f"lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} are not [r, in] and [out, r]",
                "use the file the trainer wrote, unmodified",
            )
        rank = int(down.shape[0])
        module_alpha = _pattern_value(alpha_pattern, module, base_alpha if base_alpha is not None else rank)
        layers[module] = ModuleLora((LoraPart(down, up, _peft_scale(rank, float(module_alpha), rslora)),))
    return layers


def to_peft(layers: LoraLayers, *, source: str = "?") -> tuple[dict[str, torch.Tensor], dict]:
    """Our format: state dict + the peft config (ranks and alphas per module where they differ)."""
    state: dict[str, torch.Tensor] = {}
    ranks, alphas = {}, {}
    for module, lora in layers.items():
        part = _fuse(lora.parts, source=source, module=module)
        state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = part.down.contiguous()
        state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = part.up.contiguous()
        ranks[module], alphas[module] = part.rank, part.scale * part.rank
    rank = Counter(ranks.values()).most_common(1)[0][0] if ranks else 0
    alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else 0.0
    metadata = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted(layers),
        "rank_pattern": {m: r for m, r in ranks.items() if r != rank},
        "alpha_pattern": {m: a for m, a in alphas.items() if a != alpha},
        "use_rslora": False,
        "use_dora": False,
    }
    return state, metadata


# --------------------------------------------------------------------------------------- upstream


def _upstream_name(module: str) -> str:
    return UPSTREAM_PREFIX + module.replace(".", UPSTREAM_DOT)


def from_upstream(state_dict: dict[str, torch.Tensor], *, source: str = "?") -> LoraLayers:
    """The official LoRA format (``cfg_step_lora``, ``refinement_lora``) and our upstream export."""
    pattern = re.compile(
        r"^(?P<name>.+?)\.(?:lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(?P<i>\d+)\.weight|alpha_scale)$"
    )
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        match = pattern.match(key)
        if match is None or not match["name"].startswith(UPSTREAM_PREFIX):
            unknown.append(key)
            continue
        grouped.setdefault(match["name"], {})[key[len(match["name"]) + 1 :]] = tensor
    if unknown:
        raise _bad_file(
            source,
            unknown,
            f"an upstream LongCat-Video LoRA has only {UPSTREAM_PREFIX}<module>.lora_down.weight, .lora_up.weight "
            "or .lora_up.blocks.<i>.weight, and .alpha_scale keys",
            "pass the official lora/*.safetensors file or one written by export_lora --format upstream",
        )
    layers: LoraLayers = {}
    for name, tensors in sorted(grouped.items()):
        module = name[len(UPSTREAM_PREFIX) :].replace(UPSTREAM_DOT, ".")
        down, scale = tensors.get("lora_down.weight"), tensors.get("alpha_scale")
        blocks = sorted((int(k.split(".")[2]), v) for k, v in tensors.items() if k.startswith("lora_up.blocks."))
        ups = [v for _, v in blocks] if blocks else [tensors["lora_up.weight"]] if "lora_up.weight" in tensors else []
        missing = [f"{name}.{k}" for k, v in (("lora_down.weight", down), ("alpha_scale", scale)) if v is None]
        if not ups:
            missing.append(f"{name}.lora_up.weight")
        if missing:
            raise _bad_file(
                source,
                missing,
                f"module {module} lacks keys its LoRA needs (upstream loads these files with strict=True)",
                "use the complete file; an upstream LoRA module has a down, an up (or up blocks) and an alpha_scale",
            )
        if blocks and ([i for i, _ in blocks] != list(range(len(blocks))) or "lora_up.weight" in tensors):
            raise _bad_file(
                source,
                [f"{name}.lora_up.blocks.{i}.weight" for i, _ in blocks],
                f"module {module}'s up blocks must be numbered 0..n-1 with no plain lora_up.weight beside them",
                "use the complete file the exporter or upstream wrote",
            )
        rank = int(ups[0].shape[1]) if ups[0].dim() == 2 else -1
        if (
            down.dim() != 2
            or rank < 0
            or down.shape[0] != rank * len(ups)
            or any(u.dim() != 2 or u.shape[1] != rank for u in ups)
        ):
            raise _bad_file(
                source,
                [f"{name}.lora_down.weight"],
                f"module {module}: lora_down {tuple(down.shape)} must be [n*r, in] for {len(ups)} up block(s) "
                f"of shape [out/n, r]; got ups {[tuple(u.shape) for u in ups]}",
                "use the file unmodified",
            )
        value = float(scale.float().item()) if scale.numel() == 1 else None
        if value is None:
            raise _bad_file(
                source, [f"{name}.alpha_scale"], "alpha_scale must be one number", "use the file unmodified"
            )
        parts = [LoraPart(down[i * rank : (i + 1) * rank], up, value) for i, up in enumerate(ups)]
        layers[module] = _joined(parts)
    return layers


def to_upstream(layers: LoraLayers, *, source: str = "?") -> dict[str, torch.Tensor]:
    """Upstream's key format, loadable by ``LongCatVideoTransformer3DModel.load_lora`` upstream.

    Upstream builds every module with one rank (``lora_network_dim``), so all modules must share
    one per-block rank; the scale goes into ``alpha_scale``, which upstream reads from the file.
    """
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, lora in layers.items():
        parts = lora.parts
        even = len({p.rank for p in parts}) == 1 and len({p.up.shape[0] for p in parts}) == 1
        if len(parts) > 1 and not (even and len({p.scale for p in parts}) == 1):
            parts = (_fuse(parts, source=source, module=module),)
        name = _upstream_name(module)
        state[f"{name}.lora_down.weight"] = torch.cat([p.down for p in parts], dim=0).contiguous()
        if len(parts) == 1:
            state[f"{name}.lora_up.weight"] = parts[0].up.contiguous()
        else:
            for i, part in enumerate(parts):
                state[f"{name}.lora_up.blocks.{i}.weight"] = part.up.contiguous()
        state[f"{name}.alpha_scale"] = torch.tensor(parts[0].scale, dtype=torch.float32)
        ranks[module] = parts[0].rank
    if len(set(ranks.values())) > 1:
        by_rank = sorted(set(ranks.values()))
        raise _bad_file(
            source,
            [f"{m} (rank {r})" for m, r in ranks.items() if r != by_rank[0]],
            f"the upstream loader builds every module with one rank (lora_network_dim); this LoRA has ranks {by_rank}",
            "export to --format comfyui or peft instead, or train with one rank for all modules",
        )
    return state


# ---------------------------------------------------------------------------------------- comfyui


def _comfy_table(layers_or_names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    table = {}
    for module in layers_or_names:
        match = re.match(r"^blocks\.(\d+)\.(.+)$", module)
        key = f"blocks.{{i}}.{match[2]}" if match else module
        targets = COMFY_MODULES.get(key)
        if targets is not None:
            table[module] = tuple(t.format(i=match[1]) if match else t for t in targets)
    return table


def to_comfyui(layers: LoraLayers, *, source: str = "?") -> dict[str, torch.Tensor]:
    """kijai's ComfyUI-WanVideoWrapper names: fused projections split into their Wan modules."""
    table = _comfy_table(layers)
    unmapped = [m for m in layers if m not in table]
    if unmapped:
        raise _bad_file(
            source,
            unmapped,
            f"these modules have no known ComfyUI (WanVideoWrapper) name; mapped are {sorted(COMFY_MODULES)}",
            "train LoRA on the default targets (attention, cross-attention, FFN), or export to --format upstream",
        )
    state: dict[str, torch.Tensor] = {}
    for module, lora in layers.items():
        targets = table[module]
        size = lora.out_features // len(targets)
        for index, target in enumerate(targets):
            part = _rows(lora, index * size, (index + 1) * size, source=source, module=module)
            if part.rank == 0:
                continue
            key = f"{COMFY_PREFIX}{target}"
            state[f"{key}.lora_down.weight"] = part.down.contiguous()
            state[f"{key}.lora_up.weight"] = part.up.contiguous()
            state[f"{key}.alpha"] = torch.tensor(part.scale * part.rank, dtype=torch.float32)
    return state


def from_comfyui(state_dict: dict[str, torch.Tensor], *, source: str = "?") -> LoraLayers:
    """A ComfyUI LoRA for LongCat-Video (our export, or one made for kijai's wrapper)."""
    suffixes = {
        ".lora_down.weight": "down",
        ".lora_A.weight": "down",
        ".lora_up.weight": "up",
        ".lora_B.weight": "up",
        ".alpha": "alpha",
    }
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state_dict.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None or not key.startswith(COMFY_PREFIX):
            unknown.append(key)
            continue
        grouped.setdefault(key[len(COMFY_PREFIX) : -len(suffix)], {})[suffixes[suffix]] = tensor
    reverse = {}
    for pattern, targets in COMFY_MODULES.items():
        for index, target in enumerate(targets):
            reverse[target] = (pattern, index, len(targets))
    pieces: dict[str, dict[int, LoraPart]] = {}
    counts: dict[str, int] = {}
    for comfy_module, tensors in sorted(grouped.items()):
        match = re.match(r"^blocks\.(\d+)\.(.+)$", comfy_module)
        found = reverse.get(f"blocks.{{i}}.{match[2]}" if match else comfy_module)
        if found is None:
            unknown.append(f"{COMFY_PREFIX}{comfy_module}.*")
            continue
        if "down" not in tensors or "up" not in tensors:
            raise _bad_file(
                source,
                [f"{COMFY_PREFIX}{comfy_module}.lora_{'down' if 'down' not in tensors else 'up'}.weight"],
                f"module {comfy_module} has only one of lora_down / lora_up",
                "use the complete file",
            )
        down, up = tensors["down"], tensors["up"]
        if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
            raise _bad_file(
                source,
                [f"{COMFY_PREFIX}{comfy_module}.lora_down.weight"],
                f"lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} are not [r, in] and [out, r]",
                "use the file unmodified",
            )
        pattern, index, count = found
        module = pattern.format(i=match[1]) if match else pattern
        rank = int(down.shape[0])
        scale = float(tensors["alpha"].float().item()) / rank if "alpha" in tensors else 1.0
        pieces.setdefault(module, {})[index] = LoraPart(down, up, scale)
        counts[module] = count
    if unknown:
        raise _bad_file(
            source,
            unknown,
            f"not a LongCat-Video ComfyUI LoRA: keys must be {COMFY_PREFIX}<module>.lora_down.weight / .lora_up.weight "
            "/ .alpha on the WanVideoWrapper modules of docs/lora.md",
            "pass a LoRA made for LongCat-Video in ComfyUI, or one written by export_lora --format comfyui",
        )
    layers: LoraLayers = {}
    for module, found_parts in pieces.items():
        present = next(iter(found_parts.values()))
        size = int(present.up.shape[0])
        parts = []
        for index in range(counts[module]):
            part = found_parts.get(index)
            if part is None:  # e.g. only q of q/k/v trained: the other rows get a rank-0 (zero) part
                part = LoraPart(present.down[:0], present.up.new_zeros(size, 0), present.scale)
            elif part.up.shape[0] != size or part.down.shape[1] != present.down.shape[1]:
                raise _bad_file(
                    source,
                    [module],
                    f"its split modules disagree in shape ({tuple(part.up.shape)} vs {tuple(present.up.shape)})",
                    "use the file unmodified",
                )
            parts.append(part)
        layers[module] = _joined(parts)
    return layers


# ----------------------------------------------------------------------------------------- files


def detect_format(state_dict: dict[str, torch.Tensor]) -> str | None:
    keys = list(state_dict)
    if keys and all(k.startswith(UPSTREAM_PREFIX) for k in keys):
        return "upstream"
    if keys and all(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfyui"
    if keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys):
        return "peft"
    return None


def read_lora_file(path: str | os.PathLike, *, alpha: float | None = None) -> tuple[LoraLayers, str]:
    """Load a LoRA file of any of :data:`FORMATS` (detected from its keys); returns (layers, format)."""
    from safetensors import SafetensorError, safe_open

    source = str(path)
    if not Path(path).is_file():
        raise LongCatVideoError(
            where="LoRA file",
            value=source,
            rule="the file does not exist",
            fix="give the path of a .safetensors LoRA (e.g. <checkpoint>/lora/cfg_step_lora.safetensors)",
        )
    try:
        with safe_open(source, framework="pt") as handle:
            header = handle.metadata()
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LongCatVideoError(
            where="LoRA file",
            value=source,
            rule=f"not a readable safetensors file ({exc})",
            fix="pass a .safetensors LoRA file",
        ) from exc
    fmt = detect_format(state)
    if fmt is None:
        raise _bad_file(
            source,
            list(state)[:3] or ["<no tensors>"],
            f"the keys match none of the LoRA formats {list(FORMATS)} (peft: transformer.<m>.lora_A/B.weight; "
            f"upstream: {UPSTREAM_PREFIX}...; comfyui: {COMFY_PREFIX}...)",
            "pass a LongCat-Video LoRA: the trainer's pytorch_lora_weights.safetensors, an official lora/ file, "
            "or a ComfyUI one",
        )
    if fmt == "peft":
        layers = from_peft(state, adapter_metadata(header), alpha=alpha, source=source)
    elif fmt == "upstream":
        layers = from_upstream(state, source=source)
    else:
        layers = from_comfyui(state, source=source)
    if not layers:
        raise _bad_file(source, ["<no modules>"], "the file holds no LoRA modules", "pass a non-empty LoRA")
    return layers, fmt


def write_lora_file(layers: LoraLayers, path: str | os.PathLike, fmt: str, *, source: str = "?") -> dict:
    """Write ``layers`` in ``fmt``; returns the tensors written (the peft config goes in the header)."""
    from safetensors.torch import save_file

    header = {"format": "pt"}
    if fmt == "peft":
        state, metadata = to_peft(layers, source=source)
        header[ADAPTER_METADATA_KEY] = json.dumps({f"{PEFT_PREFIX}{k}": v for k, v in metadata.items()})
    elif fmt == "upstream":
        state = to_upstream(layers, source=source)
    elif fmt == "comfyui":
        state = to_comfyui(layers, source=source)
    else:
        raise LongCatVideoError(where="LoRA format", value=fmt, rule=f"must be one of {list(FORMATS)}", fix="pick one")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Split projections share their down matrix and slice one up matrix; safetensors wants owned tensors.
    state = {key: tensor.detach().clone(memory_format=torch.contiguous_format) for key, tensor in state.items()}
    save_file(state, str(path), metadata=header)
    return state


# ------------------------------------------------------------------------------ applying to our DiT


def _linear(model: nn.Module, module: str) -> nn.Linear | None:
    try:
        found = model.get_submodule(module)
    except AttributeError:
        return None
    base = getattr(found, "base_layer", found)  # a peft-wrapped layer keeps the original inside
    return base if isinstance(base, nn.Linear) else None


def check_against(model: nn.Module, layers: LoraLayers, *, source: str = "?") -> None:
    """Every LoRA module must be a linear layer of ``model`` with matching in/out features."""
    missing = [m for m in layers if _linear(model, m) is None]
    if missing:
        raise _bad_file(
            source,
            missing,
            "these modules are not linear layers of the LongCat-Video transformer",
            "use a LoRA made for LongCat-Video (module names as in the official dit/ checkpoint)",
        )
    wrong = []
    for module, lora in layers.items():
        linear = _linear(model, module)
        if (linear.out_features, linear.in_features) != (lora.out_features, lora.in_features):
            wrong.append(
                f"{module}: LoRA {lora.out_features}x{lora.in_features}, model {linear.out_features}x{linear.in_features}"
            )
    if wrong:
        raise _bad_file(
            source,
            wrong,
            "the LoRA's shapes do not match the transformer's layers",
            "use a LoRA made for this checkpoint (the official one is for the 13.6B LongCat-Video DiT)",
        )


@torch.no_grad()
def merge_lora(model: nn.Module, layers: LoraLayers, *, multiplier: float = 1.0, source: str = "?") -> None:
    """Add ``multiplier * delta`` to the weights in place (sum in float32, rounded once to the weight dtype)."""
    check_against(model, layers, source=source)
    for module, lora in layers.items():
        weight = _linear(model, module).weight
        delta = lora.delta().to(weight.device)
        weight.copy_((weight.float() + delta * multiplier).to(weight.dtype))


def lora_layers_to(layers: LoraLayers, *, device: torch.device | str, dtype: torch.dtype) -> LoraLayers:
    """The same LoRA with every tensor on ``device`` in ``dtype`` (scales unchanged)."""
    return {
        module: ModuleLora(
            tuple(
                LoraPart(p.down.to(device=device, dtype=dtype), p.up.to(device=device, dtype=dtype), p.scale)
                for p in lora.parts
            )
        )
        for module, lora in layers.items()
    }


class _LoraForward:
    """Forward hook adding ``x -> sum_parts scale * up(down(x))`` to a linear layer's output, as upstream's
    ``enable_loras`` does at run time: the weights are never touched, so removing it is exact."""

    def __init__(self, lora: ModuleLora, multiplier: float) -> None:
        self.down = torch.cat([p.down for p in lora.parts], dim=0)
        self.ups = [p.up for p in lora.parts]
        self.ranks = [p.rank for p in lora.parts]
        self.scales = [p.scale * multiplier for p in lora.parts]

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if self.down.device != x.device:
            self.down, self.ups = self.down.to(x.device), [u.to(x.device) for u in self.ups]
        hidden = F.linear(x.to(self.down.dtype), self.down).split(self.ranks, dim=-1)
        extra = torch.cat([F.linear(h, up) * s for h, up, s in zip(hidden, self.ups, self.scales, strict=True)], dim=-1)
        return output + extra.to(output.dtype)


class AttachedLora:
    """LoRA forward hooks on a model; ``remove()`` (or leaving the ``with`` block) takes them off."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __enter__(self) -> AttachedLora:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_lora(model: nn.Module, layers: LoraLayers, *, multiplier: float = 1.0, source: str = "?") -> AttachedLora:
    """Apply ``layers`` at run time through forward hooks (on top of any peft adapter already there)."""
    check_against(model, layers, source=source)
    handles = [
        model.get_submodule(module).register_forward_hook(_LoraForward(lora, multiplier))
        for module, lora in layers.items()
    ]
    return AttachedLora(handles)


def describe(layers: LoraLayers) -> str:
    """One line: module count, ranks, scales and alphas (what the CLI and the preview log print)."""

    def span(values: set) -> str:
        low, high = min(values), max(values)
        return f"{low:g}" if low == high else f"{low:g}..{high:g}"

    parts = [p for lora in layers.values() for p in lora.parts if p.rank]
    split = sum(len(lora.parts) > 1 for lora in layers.values())
    return (
        f"{len(layers)} modules, rank {span({p.rank for p in parts})}, scale {span({p.scale for p in parts})} "
        f"(alpha {span({p.scale * p.rank for p in parts})})"
        + (f", {split} fused projections stored as row parts" if split else "")
    )
