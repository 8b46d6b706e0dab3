"""LoRA formats: ours (peft) <-> upstream <-> ComfyUI, checked through merged weights and real outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.lora import formats as lf
from simpletuner_longcat_video.testing.tiny import DISTILL_LORA_MODULES, build_tiny_distill_lora

RANK, ALPHA = 4, 8.0  # scale 2: a file that ignored alpha would merge half the change


@pytest.fixture(scope="module")
def dit(tiny_checkpoint: Path) -> LongCatVideoTransformer3DModel:
    return LongCatVideoTransformer3DModel.from_pretrained(tiny_checkpoint / "dit").eval()


def trained_lora_file(tiny_checkpoint: Path, folder: Path, *, rank: int = RANK, alpha: float = ALPHA) -> Path:
    """A random LoRA saved exactly the way SimpleTuner saves one: peft adapter, our pipeline's mixin."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from simpletuner_longcat_video.core.pipeline import LongCatVideoPipeline

    model = LongCatVideoTransformer3DModel.from_pretrained(tiny_checkpoint / "dit")
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGET_MODULES)))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:  # peft starts B at zero; a trained LoRA has both factors non-zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    LongCatVideoPipeline.save_lora_weights(
        str(folder),
        dit_lora_layers=get_peft_model_state_dict(model),
        dit_lora_adapter_metadata=model.peft_config["default"].to_dict(),
    )
    return folder / "pytorch_lora_weights.safetensors"


def merged(dit: torch.nn.Module, layers: lf.LoraLayers, multiplier: float = 1.0) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(dit)
    lf.merge_lora(model, layers, multiplier=multiplier)
    return model.state_dict()


def forward(model: torch.nn.Module) -> torch.Tensor:
    """One DiT call on fixed inputs (two latent frames, the first a condition frame, masked text)."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 16, 2, 4, 4, generator=generator)
    text = torch.randn(1, 6, model.config.caption_channels, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        return model(
            hidden_states=latents,
            timestep=torch.tensor([[0.0, 700.0]]),
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            num_cond_latents=1,
            return_dict=False,
        )[0]


def test_trained_lora_reads_with_its_alpha_and_merges_as_peft_does(tiny_checkpoint, dit, tmp_path):
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    path = trained_lora_file(tiny_checkpoint, tmp_path)
    layers, fmt = lf.read_lora_file(path)
    assert fmt == "peft"
    depth = dit.config.depth
    assert sorted(layers) == sorted(f"blocks.{i}.{m}" for i in range(depth) for m in LORA_TARGET_MODULES)
    assert {p.scale for lora in layers.values() for p in lora.parts} == {ALPHA / RANK}

    # Reference: diffusers loads the same file into the pipeline and peft fuses it into the weights.
    pipe = load_pipeline(str(tiny_checkpoint))
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ours = merged(dit, layers)
    theirs = pipe.transformer.state_dict()
    changed = [k for k in ours if not torch.equal(ours[k], dit.state_dict()[k])]
    assert len(changed) == len(layers)
    for key in ours:
        # Both add scale * (B @ A) to the float32 weight; only the summation order inside the matmul may differ.
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt", lf.FORMATS)
def test_round_trip_gives_identical_merged_weights(tiny_checkpoint, dit, tmp_path, fmt):
    source = trained_lora_file(tiny_checkpoint, tmp_path)
    layers, _ = lf.read_lora_file(source)
    out = tmp_path / f"exported-{fmt}.safetensors"
    lf.write_lora_file(layers, out, fmt)
    back, found = lf.read_lora_file(out)
    assert found == fmt
    # Conversions only slice and concatenate tensors, so the merged weights are bit-identical.
    reference, result = merged(dit, layers), merged(dit, back)
    assert all(torch.equal(reference[k], result[k]) for k in reference)
    assert any(not torch.equal(reference[k], dit.state_dict()[k]) for k in reference)


def test_upstream_export_has_the_official_keys_and_alpha_scale(tiny_checkpoint, tmp_path):
    layers, _ = lf.read_lora_file(trained_lora_file(tiny_checkpoint, tmp_path))
    lf.write_lora_file(layers, tmp_path / "up.safetensors", "upstream")
    state = load_file(str(tmp_path / "up.safetensors"))
    name = "lora___lorahyphen___blocks___lorahyphen___1___lorahyphen___attn___lorahyphen___qkv"
    hidden = 64
    assert state[f"{name}.lora_down.weight"].shape == (RANK, hidden)
    assert state[f"{name}.lora_up.weight"].shape == (3 * hidden, RANK)
    assert state[f"{name}.alpha_scale"].dim() == 0 and state[f"{name}.alpha_scale"].item() == ALPHA / RANK
    assert len(state) == 3 * len(layers)


def test_comfyui_export_splits_fused_projections_into_wan_modules(tiny_checkpoint, tmp_path):
    layers, _ = lf.read_lora_file(trained_lora_file(tiny_checkpoint, tmp_path))
    lf.write_lora_file(layers, tmp_path / "comfy.safetensors", "comfyui")
    state = load_file(str(tmp_path / "comfy.safetensors"))
    hidden, qkv = 64, layers["blocks.0.attn.qkv"].parts[0]
    for index, name in enumerate("qkv"):
        key = f"diffusion_model.blocks.0.self_attn.{name}"
        assert torch.equal(state[f"{key}.lora_down.weight"], qkv.down)
        assert torch.equal(state[f"{key}.lora_up.weight"], qkv.up[index * hidden : (index + 1) * hidden])
        assert state[f"{key}.alpha"].item() == ALPHA  # ComfyUI's scale is alpha / rank
    for ours, theirs in [("cross_attn.proj", "cross_attn.o"), ("attn.proj", "self_attn.o"), ("ffn.w2", "ffn.w2")]:
        assert torch.equal(
            state[f"diffusion_model.blocks.1.{theirs}.lora_up.weight"], layers[f"blocks.1.{ours}"].parts[0].up
        )
    assert not any("qkv" in key or "kv_linear" in key or "q_linear" in key for key in state)


def upstream_reference(dit: torch.nn.Module, path: Path, multiplier: float) -> dict[str, torch.Tensor]:
    """Merged weights computed by hand from the raw upstream file: W + m * alpha_scale * up_i @ down_i per block."""
    raw = load_file(str(path))
    weights = {k: v.clone() for k, v in dit.state_dict().items()}
    for key in [k for k in raw if k.endswith(".alpha_scale")]:
        name = key[: -len(".alpha_scale")]
        module = name.removeprefix("lora___lorahyphen___").replace("___lorahyphen___", ".")
        down, scale = raw[f"{name}.lora_down.weight"], raw[key].item()
        ups = [raw[k] for k in sorted(k for k in raw if k.startswith(f"{name}.lora_up.blocks."))]
        ups = ups or [raw[f"{name}.lora_up.weight"]]
        rank, rows = down.shape[0] // len(ups), ups[0].shape[0]
        weight = weights[f"{module}.weight"]
        for i, up in enumerate(ups):
            weight[i * rows : (i + 1) * rows] += multiplier * scale * (up @ down[i * rank : (i + 1) * rank])
    return weights


def test_official_layout_lora_changes_the_output_as_its_merged_weights_do(tiny_checkpoint, dit, tmp_path):
    root = tmp_path / "ckpt"
    (root / "dit").mkdir(parents=True)
    for file in (tiny_checkpoint / "dit").iterdir():
        (root / "dit" / file.name).symlink_to(file)
    path = build_tiny_distill_lora(root, rank=4, alpha_scale=0.5)
    raw = load_file(str(path))
    qkv = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    kv = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___cross_attn___lorahyphen___kv_linear"
    assert raw[f"{qkv}.lora_down.weight"].shape == (12, 64) and f"{qkv}.lora_up.blocks.2.weight" in raw
    assert raw[f"{kv}.lora_down.weight"].shape == (8, 64) and f"{kv}.lora_up.blocks.1.weight" in raw
    assert len(raw) == dit.config.depth * (5 + 3 + 3 + 4 + 3 * 3) == dit.config.depth * 24  # 1,152 for 48 blocks

    layers, fmt = lf.read_lora_file(path)
    assert fmt == "upstream" and len(layers) == dit.config.depth * len(DISTILL_LORA_MODULES)
    multiplier = 0.75
    reference = upstream_reference(dit, path, multiplier)
    ours = merged(dit, layers, multiplier)
    for key in reference:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-6, atol=1e-7)

    base = forward(dit)
    reference_model = copy.deepcopy(dit)
    reference_model.load_state_dict(reference)
    expected = forward(reference_model)
    with lf.attach_lora(dit, layers, multiplier=multiplier):
        got = forward(dit)
    after = forward(dit)
    # Hooks add x @ (m * s * up @ down)^T instead of folding it into W: same maths, float32 rounding apart.
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (expected - base).abs().max() > 100 * 1e-5
    assert torch.equal(after, base)  # removing the hooks restores the model exactly


def test_official_layout_survives_comfyui_and_back(tiny_checkpoint, dit, tmp_path):
    root = tmp_path / "ckpt"
    (root / "dit").mkdir(parents=True)
    for file in (tiny_checkpoint / "dit").iterdir():
        (root / "dit" / file.name).symlink_to(file)
    layers, _ = lf.read_lora_file(build_tiny_distill_lora(root))
    lf.write_lora_file(layers, tmp_path / "c.safetensors", "comfyui")
    comfy = load_file(str(tmp_path / "c.safetensors"))
    # Upstream's q/k/v up blocks each have their own down rows: in ComfyUI they are three LoRAs.
    q = comfy["diffusion_model.blocks.0.self_attn.q.lora_down.weight"]
    k = comfy["diffusion_model.blocks.0.self_attn.k.lora_down.weight"]
    assert q.shape == k.shape == (4, 64) and not torch.equal(q, k)
    back, _ = lf.read_lora_file(tmp_path / "c.safetensors")
    lf.write_lora_file(back, tmp_path / "u.safetensors", "upstream")
    original, again = (
        load_file(str(root / "lora" / "cfg_step_lora.safetensors")),
        load_file(str(tmp_path / "u.safetensors")),
    )
    assert sorted(original) == sorted(again) and all(torch.equal(original[k], again[k]) for k in original)


def test_official_layout_in_our_format_loads_through_diffusers(tiny_checkpoint, dit, tmp_path):
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    root = tmp_path / "ckpt"
    (root / "dit").mkdir(parents=True)
    for file in (tiny_checkpoint / "dit").iterdir():
        (root / "dit" / file.name).symlink_to(file)
    layers, _ = lf.read_lora_file(build_tiny_distill_lora(root, alpha_scale=0.5))
    lf.write_lora_file(layers, tmp_path / "peft" / "pytorch_lora_weights.safetensors", "peft")
    with safe_open(str(tmp_path / "peft" / "pytorch_lora_weights.safetensors"), "pt") as handle:
        config = json.loads(handle.metadata()["lora_adapter_metadata"])
    # Fused projections become one LoRA of rank n*r with a block-diagonal B: recorded per module.
    assert config["transformer.rank_pattern"]["blocks.0.attn.qkv"] == 12
    assert config["transformer.alpha_pattern"]["blocks.0.attn.qkv"] == 6.0

    pipe = load_pipeline(str(tiny_checkpoint))
    pipe.load_lora_weights(str(tmp_path / "peft" / "pytorch_lora_weights.safetensors"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    ours = merged(dit, layers)
    theirs = pipe.transformer.state_dict()
    for key in ours:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-6, atol=1e-7)


def test_distill_lora_applies_on_top_of_a_trained_adapter_and_leaves_it_intact(tiny_checkpoint, dit, tmp_path):
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    root = tmp_path / "ckpt"
    (root / "dit").mkdir(parents=True)
    for file in (tiny_checkpoint / "dit").iterdir():
        (root / "dit" / file.name).symlink_to(file)
    distill, _ = lf.read_lora_file(build_tiny_distill_lora(root))
    trained_path = trained_lora_file(tiny_checkpoint, tmp_path / "trained")
    trained, _ = lf.read_lora_file(trained_path)

    pipe = load_pipeline(str(tiny_checkpoint))
    pipe.load_lora_weights(str(trained_path))  # the peft adapter, as during training
    weights_before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with_trained = forward(pipe.transformer)
    with lf.attach_lora(pipe.transformer, distill):
        both = forward(pipe.transformer)
    assert torch.equal(forward(pipe.transformer), with_trained)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(weights_before[k], after[k]) for k in weights_before)

    reference = copy.deepcopy(dit)
    lf.merge_lora(reference, trained)
    lf.merge_lora(reference, distill)
    torch.testing.assert_close(both, forward(reference), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- bad files


def write(path: Path, state: dict[str, torch.Tensor]) -> Path:
    save_file(state, str(path))
    return path


def upstream_module(rank: int = 2, hidden: int = 64, name: str = "blocks.0.attn.proj") -> dict[str, torch.Tensor]:
    key = "lora___lorahyphen___" + name.replace(".", "___lorahyphen___")
    return {
        f"{key}.lora_down.weight": torch.ones(rank, hidden),
        f"{key}.lora_up.weight": torch.ones(hidden, rank),
        f"{key}.alpha_scale": torch.tensor(0.5),
    }


def test_unknown_keys_are_named_with_the_file(tmp_path):
    state = upstream_module() | {"lora___lorahyphen___blocks___lorahyphen___0.lora_mid.weight": torch.ones(2, 2)}
    path = write(tmp_path / "bad.safetensors", state)
    with pytest.raises(LongCatVideoError) as info:
        lf.read_lora_file(path)
    assert str(path) in info.value.where
    assert info.value.value == ["lora___lorahyphen___blocks___lorahyphen___0.lora_mid.weight"]
    assert "lora_down.weight" in info.value.rule and info.value.fix


def test_keys_of_no_known_format_are_refused(tmp_path):
    path = write(tmp_path / "other.safetensors", {"unet.down.0.weight": torch.ones(2, 2)})
    with pytest.raises(LongCatVideoError, match="match none of the LoRA formats"):
        lf.read_lora_file(path)


def test_missing_b_is_named(tmp_path):
    path = write(tmp_path / "half.safetensors", {"transformer.blocks.0.attn.proj.lora_A.weight": torch.ones(2, 64)})
    with pytest.raises(LongCatVideoError) as info:
        lf.read_lora_file(path)
    assert "only one of lora_A / lora_B" in info.value.rule
    assert info.value.value == ["transformer.blocks.0.attn.proj.lora_A.weight"]


def test_missing_up_and_alpha_scale_are_named(tmp_path):
    state = upstream_module()
    state = {k: v for k, v in state.items() if not k.endswith(("lora_up.weight", "alpha_scale"))}
    with pytest.raises(LongCatVideoError) as info:
        lf.read_lora_file(write(tmp_path / "noup.safetensors", state))
    name = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___proj"
    assert info.value.value == [f"{name}.alpha_scale", f"{name}.lora_up.weight"]


def test_shape_mismatch_with_the_transformer_is_named(dit, tmp_path):
    path = write(tmp_path / "big.safetensors", upstream_module(hidden=128))
    layers, _ = lf.read_lora_file(path)
    with pytest.raises(LongCatVideoError) as info:
        lf.attach_lora(dit, layers, source=str(path))
    assert info.value.value == ["blocks.0.attn.proj: LoRA 128x128, model 64x64"]
    assert "shapes do not match" in info.value.rule and str(path) in info.value.where


def test_module_missing_from_the_transformer_is_named(dit, tmp_path):
    layers, _ = lf.read_lora_file(write(tmp_path / "deep.safetensors", upstream_module(name="blocks.7.attn.proj")))
    with pytest.raises(LongCatVideoError) as info:
        lf.merge_lora(dit, layers)
    assert info.value.value == ["blocks.7.attn.proj"]


def test_inconsistent_down_and_up_shapes_are_named(tmp_path):
    state = upstream_module()
    key = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___proj"
    state[f"{key}.lora_down.weight"] = torch.ones(3, 64)
    with pytest.raises(LongCatVideoError, match=r"must be \[n\*r, in\]"):
        lf.read_lora_file(write(tmp_path / "shape.safetensors", state))


def test_not_a_safetensors_file_and_no_file_are_named(tmp_path):
    (tmp_path / "x.safetensors").write_text("not a tensor file")
    with pytest.raises(LongCatVideoError, match="not a readable safetensors file"):
        lf.read_lora_file(tmp_path / "x.safetensors")
    with pytest.raises(LongCatVideoError, match="does not exist"):
        lf.read_lora_file(tmp_path / "absent.safetensors")


def test_mixed_ranks_cannot_go_upstream(tmp_path):
    state = upstream_module(rank=2) | upstream_module(rank=3, name="blocks.0.ffn.w9")
    layers, _ = lf.read_lora_file(write(tmp_path / "mixed.safetensors", state))
    with pytest.raises(LongCatVideoError, match="one rank"):
        lf.write_lora_file(layers, tmp_path / "out.safetensors", "upstream")
