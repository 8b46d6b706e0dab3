"""LongCatVideoTransformer3DModel: checkpoint compatibility, numerics, I2V rules, training hooks.

Everything runs on the CPU with a tiny config built through the real constructor; the one
full-size check builds the model on the meta device (no memory, no weights).
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.attention import AttentionOptions
from simpletuner_longcat_video.core.transformer import LORA_TARGET_MODULES, LongCatVideoTransformer3DModel
from simpletuner_longcat_video.errors import LongCatVideoError

DATA = Path(__file__).parent / "data"

TINY = dict(
    in_channels=8,
    out_channels=8,
    hidden_size=64,
    depth=2,
    num_heads=4,
    caption_channels=32,
    mlp_ratio=4,
    adaln_tembed_dim=32,
    frequency_embedding_size=32,
)

# A dit/config.json with every field upstream's model __init__ takes (the names the official file uses).
OFFICIAL_CONFIG = {"_class_name": "LongCatVideoTransformer3DModel", **spec.OFFICIAL_DIT_CONFIG}


def seeded_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every tensor from a seeded generator, in name order (independent of init code)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            noise = torch.randn(tensor.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif tensor.ndim >= 2:
                value = noise / math.sqrt(tensor[0].numel())
            else:
                value = 0.05 * noise
            tensor.copy_(value.to(tensor.dtype))
    return model


def tiny_model(seed: int = 0, **overrides: object) -> LongCatVideoTransformer3DModel:
    model = LongCatVideoTransformer3DModel(**{**TINY, **overrides})
    model.set_attention_options(backend="sdpa")
    return seeded_init(model, seed).eval()


def inputs(batch: int = 2, frames: int = 3, height: int = 6, width: int = 8, text_len: int = 7, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TINY["in_channels"], frames, height, width, generator=gen)
    t = torch.rand(batch, generator=gen) * 1000
    y = torch.randn(batch, 1, text_len, TINY["caption_channels"], generator=gen)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    return x, t, y, mask


def run(model, x, t, y, mask=None, ncl=0) -> torch.Tensor:
    return model(x, t, y, mask, num_cond_latents=ncl, return_dict=False)[0]


def i2v_timesteps(t: torch.Tensor, frames: int, ncl: int = 1) -> torch.Tensor:
    per_frame = t[:, None].repeat(1, frames)
    per_frame[:, :ncl] = 0.0
    return per_frame


# -- checkpoint compatibility ------------------------------------------------------------------


def _official_keys() -> dict[str, list[int]]:
    keys = {}
    for line in (DATA / "official_dit_keys.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape = line.split("\t")
        keys[name] = json.loads(shape)
    return keys


def test_full_size_state_dict_matches_official_key_list():
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel()
    ours = {name: list(t.shape) for name, t in model.state_dict().items()}
    official = _official_keys()
    assert sorted(set(official) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(official)) == [], "unexpected keys"
    assert {k: v for k, v in ours.items() if official[k] != v} == {}, "shape mismatches"
    assert len(ours) == 1022
    assert sum(math.prod(s) for s in ours.values()) == 13_581_071_424
    assert isinstance(model.blocks, torch.nn.ModuleList) and len(model.blocks) == 48


def test_official_config_loads_and_the_model_config_is_architecture_only():
    from simpletuner_longcat_video.core.transformer import UPSTREAM_RUNTIME_KEYS

    _, unused, _ = LongCatVideoTransformer3DModel.extract_init_dict(dict(OFFICIAL_CONFIG))
    assert {k: v for k, v in unused.items() if not k.startswith("_")} == {}
    # Every official field is either a constructor argument or one of upstream's run-time switches.
    ours = set(inspect.signature(LongCatVideoTransformer3DModel.__init__).parameters) - {"self"}
    assert ours == set(OFFICIAL_CONFIG) - {"_class_name"} - UPSTREAM_RUNTIME_KEYS
    assert UPSTREAM_RUNTIME_KEYS <= set(OFFICIAL_CONFIG)
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel.from_config(OFFICIAL_CONFIG)
    assert model.config.text_tokens_zero_pad is True
    assert not UPSTREAM_RUNTIME_KEYS & set(model.config)
    # Attention is run-time state: the config's bsa_params (0.9375, 4x4x4) do not set it.
    assert model.attention_options == AttentionOptions()
    model.set_attention_options(sparsity=0.9375, chunk=(4, 4, 4))
    assert (model.attention_options.sparsity, model.attention_options.chunk) == (0.9375, (4, 4, 4))
    with pytest.raises(LongCatVideoError, match="power of two in"):
        model.set_attention_options(chunk=(3, 3, 3))


def test_sharded_checkpoint_round_trip(tmp_path):
    model = tiny_model()
    root = tmp_path / "LongCat-Video"
    model.save_pretrained(root / "dit", max_shard_size="100KB", safe_serialization=True)
    index = json.loads((root / "dit" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert set(index["weight_map"]) == set(model.state_dict())

    loaded, info = LongCatVideoTransformer3DModel.from_pretrained(root, subfolder="dit", output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == [] and info["error_msgs"] == []
    loaded.set_attention_options(backend="sdpa")
    x, t, y, mask = inputs()
    with torch.no_grad():
        assert torch.equal(run(model, x, t, y, mask), run(loaded.eval(), x, t, y, mask))

    # Loading in bf16 keeps the declared float32 pieces in float32 and still runs.
    low = LongCatVideoTransformer3DModel.from_pretrained(root, subfolder="dit", torch_dtype=torch.bfloat16)
    assert low.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert low.t_embedder.mlp[0].weight.dtype == torch.float32
    assert low.blocks[0].attn.q_norm.weight.dtype == torch.float32
    with torch.no_grad():
        out = run(low.eval(), x.bfloat16(), t, y.bfloat16(), mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_matches_upstream_reference_outputs():
    # Outputs of upstream's own module (its attention calls replaced by plain SDPA), same
    # seeded weights and inputs; derivation in the file's metadata.
    ref = load_file(DATA / "upstream_tiny_reference.safetensors")
    for zero_pad in (False, True):
        model = tiny_model(seed=0, text_tokens_zero_pad=zero_pad)
        for ncl in (0, 1):
            tag = f"zp{int(zero_pad)}_ncl{ncl}"
            with torch.no_grad():
                out = run(model, ref["x"], ref["t"], ref["y"], ref["mask"], ncl=ncl)
            torch.testing.assert_close(out, ref[f"out_{tag}"], atol=2e-5, rtol=1e-5)


# -- shapes, dtypes, determinism ---------------------------------------------------------------


@pytest.mark.parametrize("ncl", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_shape_and_dtype(ncl, dtype):
    model = tiny_model().to(dtype)
    x, t, y, mask = inputs()
    with torch.no_grad():
        out = run(model, x.to(dtype), i2v_timesteps(t, 3, ncl) if ncl else t, y.to(dtype), mask, ncl=ncl)
    assert out.shape == (2, TINY["out_channels"], 3, 6, 8)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_return_dict_and_input_forms_agree():
    model = tiny_model()
    x, t, y, mask = inputs()
    with torch.no_grad():
        base = run(model, x, t, y, mask)
        assert torch.equal(base, model(x, t, y, mask).sample)
        assert torch.equal(base, run(model, x, t[:, None].repeat(1, 3), y[:, 0], mask[:, None, None, :]))
        assert torch.equal(base, run(model, x, t, y, None))


def test_deterministic():
    model = tiny_model()
    x, t, y, mask = inputs()
    with torch.no_grad():
        assert torch.equal(run(model, x, t, y, mask), run(model, x, t, y, mask))


def test_bf16_agrees_with_fp32():
    model32 = tiny_model()
    model16 = tiny_model().to(torch.bfloat16)
    x, t, y, mask = inputs()
    # The model rounds timesteps to its dtype (as upstream does); use bf16-exact ones so both
    # models embed the same time and only the arithmetic differs.
    t = i2v_timesteps(t.bfloat16().float(), 3)
    with torch.no_grad():
        ref = run(model32, x, t, y, mask, ncl=1)
        low = run(model16, x, t, y, mask, ncl=1)
    rel = (low - ref).norm() / ref.norm()
    assert rel < 3e-2, rel


def test_fp32_pieces_stay_fp32_under_bf16_autocast():
    model = tiny_model()
    x, t, y, mask = inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        temb = model.t_embedder(t)
        mod = model.blocks[0].adaLN_modulation(temb)
        out = run(model, x, t, y, mask)
    assert temb.dtype == torch.float32 and mod.dtype == torch.float32 and out.dtype == torch.float32


# -- image-to-video rules ----------------------------------------------------------------------


def test_condition_frame_ignores_noisy_frames_prompt_and_noisy_timesteps():
    model = tiny_model()
    x, t, y, mask = inputs()
    t_frames = i2v_timesteps(t, 3)
    with torch.no_grad():
        base = run(model, x, t_frames, y, mask, ncl=1)
        x2 = x.clone()
        x2[:, :, 1:] = torch.randn_like(x2[:, :, 1:])
        other_noise = run(model, x2, t_frames, y, mask, ncl=1)
        other_prompt = run(model, x, t_frames, torch.randn_like(y), mask, ncl=1)
        t2 = t_frames.clone()
        t2[:, 1:] = 17.0
        other_time = run(model, x, t2, y, mask, ncl=1)
    for other in (other_noise, other_prompt, other_time):
        torch.testing.assert_close(other[:, :, :1], base[:, :, :1], atol=1e-6, rtol=0)
        assert not torch.allclose(other[:, :, 1:], base[:, :, 1:])


def test_condition_frame_steers_noisy_frames():
    model = tiny_model()
    x, t, y, mask = inputs()
    with torch.no_grad():
        with_cond = run(model, x, i2v_timesteps(t, 3), y, mask, ncl=1)[:, :, 1:]
        without = run(model, x[:, :, 1:], t, y, mask, ncl=0)
        x2 = x.clone()
        x2[:, :, :1] = torch.randn_like(x2[:, :, :1])
        other_cond = run(model, x2, i2v_timesteps(t, 3), y, mask, ncl=1)[:, :, 1:]
    assert not torch.allclose(with_cond, without, atol=1e-4)
    assert not torch.allclose(with_cond, other_cond, atol=1e-4)


def test_num_cond_latents_must_leave_noisy_frames():
    model = tiny_model()
    x, t, y, mask = inputs()
    with pytest.raises(LongCatVideoError, match="num_cond_latents"):
        run(model, x, t, y, mask, ncl=3)
    with pytest.raises(LongCatVideoError, match="divisible by the patch"):
        run(model, x[..., :5], t, y, mask)


# -- text masking ------------------------------------------------------------------------------


@pytest.mark.parametrize("ncl", [0, 1])
def test_batched_prompts_of_different_lengths_equal_each_alone(ncl):
    model = tiny_model()
    x, t, y, _ = inputs(text_len=7)
    lengths = [7, 3]
    mask = torch.tensor([[1] * n + [0] * (7 - n) for n in lengths])
    y = y.clone()
    y[1, :, 3:] = 1e3 * torch.randn_like(y[1, :, 3:])  # loud garbage where the mask says padding
    tt = i2v_timesteps(t, 3, ncl) if ncl else t
    with torch.no_grad():
        batched = run(model, x, tt, y, mask, ncl=ncl)
        for i, n in enumerate(lengths):
            alone = run(model, x[i : i + 1], tt[i : i + 1], y[i : i + 1, :, :n], None, ncl=ncl)
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=1e-5)


def test_zero_pad_mode_ignores_padding_content_but_attends_to_padded_slots():
    model = tiny_model(text_tokens_zero_pad=True)
    x, t, y, _ = inputs(text_len=7)
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4])
    y2 = y.clone()
    y2[1, :, 3:] = torch.randn_like(y2[1, :, 3:])
    with torch.no_grad():
        a = run(model, x, t, y, mask)
        b = run(model, x, t, y2, mask)
        alone_padded = run(model, x[1:], t[1:], y[1:], mask[1:])
        alone_short = run(model, x[1:], t[1:], y[1:, :, :3], None)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a[1:], alone_padded, atol=1e-5, rtol=1e-5)
    # Upstream semantics: zeroed slots still take part in the softmax.
    assert not torch.allclose(alone_padded, alone_short, atol=1e-4)


def test_sample_without_any_valid_token_is_finite():
    model = tiny_model()
    x, t, y, _ = inputs()
    mask = torch.tensor([[1] * 7, [0] * 7])
    with torch.no_grad():
        out = run(model, x, t, y, mask)
    assert torch.isfinite(out).all()


# -- training hooks ----------------------------------------------------------------------------


def _loss_and_grads(model, x, t, y, mask):
    model.zero_grad(set_to_none=True)
    out = run(model, x, i2v_timesteps(t, 3), y, mask, ncl=1)
    loss = out[:, :, 1:].pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_same_loss_and_grads():
    model = tiny_model().train()
    x, t, y, _ = inputs()
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    loss_ref, grads_ref = _loss_and_grads(model, x, t, y, mask)
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    loss_ckpt, grads_ckpt = _loss_and_grads(model, x, t, y, mask)
    assert torch.equal(loss_ref, loss_ckpt)
    assert grads_ref.keys() == grads_ckpt.keys() and len(grads_ref) > 0
    for name in grads_ref:
        torch.testing.assert_close(grads_ckpt[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)


def _probing_backend(probes: list[int]):
    """A backend whose availability probe runs a forward and backward, as the block-sparse one does."""
    import torch.nn.functional as F

    def probe() -> bool:
        probes.append(1)
        q = torch.randn(1, 1, 8, 4, requires_grad=True)
        F.scaled_dot_product_attention(q, q, q).sum().backward()
        return True

    def backend(q, k, v, **_):
        return F.scaled_dot_product_attention(q, k, v)

    return backend, probe


@pytest.mark.parametrize("when", ["at set_attention_options", "inside the first checkpointed block"])
def test_a_backend_probe_with_autograd_does_not_break_checkpointing(monkeypatch, when):
    """On the H200 the first checkpointed step raised "A different number of tensors was saved during
    the original forward and recomputation": the block-sparse probe (a forward and backward, asked
    once) ran inside block 0's forward and not in its recomputation."""
    from simpletuner_longcat_video.core import attention

    model = tiny_model().train()
    x, t, y, mask = inputs()
    loss_ref, grads_ref = _loss_and_grads(model, x, t, y, mask)
    probes: list[int] = []
    backend, probe = _probing_backend(probes)
    monkeypatch.setattr(attention, "_REGISTRY", dict(attention._REGISTRY))
    attention.register_backend(attention.Backend("probing", backend, probe))
    if when == "at set_attention_options":
        model.set_attention_options(backend="probing")
        assert probes == [1]  # asked at setup, outside any forward
    else:
        # Options set without asking (as a caller holding an old registry would): the probe then
        # runs inside block 0's checkpointed forward.
        model.attention_options = attention.AttentionOptions(backend="probing")
        assert probes == []
    model.enable_gradient_checkpointing()
    loss, grads = _loss_and_grads(model, x, t, y, mask)
    assert probes == [1]
    assert torch.equal(loss, loss_ref)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_lora_targets_cover_attention_and_ffn_only():
    model = tiny_model()
    names = [n for n, _ in model.named_modules()]
    for target in LORA_TARGET_MODULES:
        hits = [n for n in names if n == target or n.endswith("." + target)]
        assert len(hits) == TINY["depth"], (target, hits)


def test_lora_trains_saves_and_reloads_bit_exactly(tmp_path):
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=8, target_modules=list(LORA_TARGET_MODULES), init_lora_weights=True)
    model = tiny_model().train()
    model.requires_grad_(False)
    model.add_adapter(config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(LORA_TARGET_MODULES) * TINY["depth"]

    x, t, y, mask = inputs()
    with torch.no_grad():
        before = run(model, x, t, y, mask)
    optimizer = torch.optim.SGD(trainable.values(), lr=1e-1)
    loss = run(model, x, i2v_timesteps(t, 3), y, mask, ncl=1)[:, :, 1:].pow(2).mean()
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = run(model, x, t, y, mask)
    assert not torch.allclose(before, after)

    model.save_lora_adapter(tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert len(saved) == len(trainable)

    fresh = tiny_model()
    fresh.load_lora_adapter(
        str(tmp_path / "lora"), weight_name="pytorch_lora_weights.safetensors", prefix=None, adapter_name="default"
    )
    with torch.no_grad():
        assert torch.equal(run(fresh.eval(), x, t, y, mask), after)


def test_attention_options_are_validated():
    model = tiny_model()
    with pytest.raises(LongCatVideoError, match="no such backend"):
        model.set_attention_options(backend="no-such-kernel")
    opts = model.set_attention_options(AttentionOptions(backend="auto", sparsity=0.5))
    assert model.attention_options is opts and opts.sparsity == 0.5
