"""The export command, and validation previews with the distillation LoRA (family hooks and a real host run)."""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, host_environ
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_lora_formats import ALPHA, RANK, forward, merged, trained_lora_file

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.transformer import LongCatVideoTransformer3DModel
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.lora import formats as lf
from simpletuner_longcat_video.testing.tiny import build_tiny_distill_lora


def export(*args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it: a fresh interpreter of the project environment."""
    return subprocess.run(
        [sys.executable, "-m", "simpletuner_longcat_video.lora.export", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=host_environ(),
        cwd=tempfile.gettempdir(),  # not the repo root, whose kernels/ would shadow a PyPI package
    )


@pytest.fixture(scope="module")
def dit(tiny_checkpoint: Path) -> LongCatVideoTransformer3DModel:
    return LongCatVideoTransformer3DModel.from_pretrained(tiny_checkpoint / "dit").eval()


@pytest.fixture(scope="module")
def trained(tiny_checkpoint: Path, tmp_path_factory) -> Path:
    return trained_lora_file(tiny_checkpoint, tmp_path_factory.mktemp("trained"))


@pytest.fixture
def distill_checkpoint(tiny_checkpoint: Path, tmp_path: Path) -> Path:
    """The tiny checkpoint (linked) plus a tiny lora/cfg_step_lora.safetensors in the official layout."""
    root = tmp_path / "ckpt"
    root.mkdir()
    for folder in tiny_checkpoint.iterdir():
        (root / folder.name).symlink_to(folder)
    build_tiny_distill_lora(root)
    return root


@pytest.mark.parametrize("fmt", ["upstream", "comfyui"])
def test_command_writes_a_file_that_loads_to_the_same_merged_weights(trained, dit, tiny_checkpoint, tmp_path, fmt):
    out = tmp_path / f"lora-{fmt}.safetensors"
    result = export(str(trained), "--format", fmt, "-o", str(out), "--check-against", str(tiny_checkpoint))
    assert result.returncode == 0, result.stderr
    layers, _ = lf.read_lora_file(trained)
    assert f"read {trained} (peft format): {len(layers)} modules, rank {RANK}" in result.stdout
    assert f"(alpha {ALPHA:g})" in result.stdout
    written = load_file(str(out))
    assert f"wrote {out} ({fmt} format): {len(written)} tensors" in result.stdout
    back, found = lf.read_lora_file(out)
    assert found == fmt
    reference, result_weights = merged(dit, layers), merged(dit, back)
    assert all(torch.equal(reference[k], result_weights[k]) for k in reference)
    if fmt == "upstream":
        assert f"lora_network_dim={RANK}" in result.stdout


def test_command_converts_the_official_layout_to_ours(distill_checkpoint, dit, tmp_path):
    source = distill_checkpoint / spec.DISTILL_LORA_FILE
    out = tmp_path / "ours.safetensors"
    result = export(str(source), "--format", "peft", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "(upstream format)" in result.stdout and "fused projections stored as row parts" in result.stdout
    official, _ = lf.read_lora_file(source)
    ours, found = lf.read_lora_file(out)
    assert found == "peft"
    # Ours holds each fused projection as one block-diagonal LoRA: the same change, summed in another order.
    reference, got = merged(dit, official), merged(dit, ours)
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-6, atol=1e-7)


def test_alpha_flag_sets_the_scale_of_a_file_without_metadata(trained, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(trained)), str(bare))  # what SimpleTuner's final save wrote before: no metadata
    default = export(str(bare), "--format", "upstream", "-o", str(tmp_path / "a.safetensors"))
    assert default.returncode == 0 and "lora_alpha = rank (scale 1) was assumed" in default.stdout
    given = export(str(bare), "--format", "upstream", "-o", str(tmp_path / "b.safetensors"), "--alpha", "12")
    assert given.returncode == 0 and "was assumed" not in given.stdout
    scales = [
        {v.item() for k, v in load_file(str(tmp_path / name)).items() if k.endswith(".alpha_scale")}
        for name in ("a.safetensors", "b.safetensors")
    ]
    assert scales == [{1.0}, {12 / RANK}]


def test_command_errors_are_named(trained, tmp_path, distill_checkpoint):
    missing = export(str(tmp_path / "absent.safetensors"), "--format", "comfyui", "-o", str(tmp_path / "o.st"))
    assert missing.returncode == 2 and "export_lora: error: LoRA file = " in missing.stderr
    assert "does not exist" in missing.stderr and "Fix:" in missing.stderr

    same = export(str(trained), "--format", "upstream", "-o", str(trained))
    assert same.returncode == 2 and "would overwrite the input" in same.stderr

    bad_format = export(str(trained), "--format", "kohya", "-o", str(tmp_path / "o.st"))
    assert bad_format.returncode == 2 and "invalid choice: 'kohya'" in bad_format.stderr

    # A LoRA for a model with another hidden size does not fit this checkpoint.
    wide = tmp_path / "wide.safetensors"
    name = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___proj"
    save_file(
        {
            f"{name}.lora_down.weight": torch.ones(2, 96),
            f"{name}.lora_up.weight": torch.ones(96, 2),
            f"{name}.alpha_scale": torch.tensor(1.0),
        },
        str(wide),
    )
    mismatch = export(
        str(wide), "--format", "comfyui", "-o", str(tmp_path / "w.st"), "--check-against", str(distill_checkpoint)
    )
    assert mismatch.returncode == 2
    assert "blocks.0.attn.proj: LoRA 96x96, model 64x64" in mismatch.stderr and not (tmp_path / "w.st").exists()


# ------------------------------------------------------------------------------ validation previews


def preview_family(pipeline, path: Path | None):
    """Our family class with just the state its preview hooks read (the host builds the rest)."""
    from simpletuner_longcat_video.host.family import LongCatVideo

    family = LongCatVideo.__new__(LongCatVideo)
    family.config = SimpleNamespace(
        longcat_validation_distill_lora=None if path is None else str(path),
        validation_num_video_frames=9,
        weight_dtype=torch.float32,
    )
    family.accelerator = None
    family.model = pipeline.transformer
    family.pipeline = pipeline
    return family


def host_kwargs() -> dict:
    """What the host's validation hands update_pipeline_call_kwargs (its own steps and guidance)."""
    return {
        "prompt": "a red square moves",
        "num_inference_steps": 40,
        "guidance_scale": 4.0,
        "height": 64,
        "width": 64,
        "output_type": "latent",
    }


def test_preview_samples_16_steps_at_guidance_1_with_the_lora_applied_only_during_the_call(
    tiny_checkpoint, distill_checkpoint, trained, caplog
):
    from simpletuner_longcat_video.core.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_checkpoint))
    pipe.load_lora_weights(str(trained))  # the adapter being trained
    path = distill_checkpoint / spec.DISTILL_LORA_FILE
    family = preview_family(pipe, path)

    kwargs = family.update_pipeline_call_kwargs(host_kwargs())
    assert (kwargs["num_inference_steps"], kwargs["guidance_scale"]) == (spec.DISTILL_STEPS, spec.DISTILL_GUIDANCE)
    assert kwargs["use_distill"] is True
    assert family.supports_multistage_validation()

    before_weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plain = forward(pipe.transformer)
    seen = {}

    def host_call(pipeline, call_kwargs, target_stage=None):
        # The host's callable runs the pipeline; here it also records the DiT output inside the call.
        seen["inside"] = forward(pipeline.transformer)
        return pipeline(**(call_kwargs | {"output_type": "latent"}))

    # The plugin's loggers do not propagate to the root (the host configures its own), so listen directly.
    pipeline_logger = logging.getLogger("simpletuner_longcat_video.core.pipeline")
    pipeline_logger.addHandler(caplog.handler)
    try:
        result = family.run_multistage_validation(kwargs, host_call)
    finally:
        pipeline_logger.removeHandler(caplog.handler)
    assert result.frames.shape == (1, 16, 3, 8, 8)
    lines = [r.getMessage() for r in caplog.records]
    assert any("16 steps on the distillation grid, guidance 1.00" in m and "CFG" not in m for m in lines), lines

    distill, _ = lf.read_lora_file(path)
    reference = copy.deepcopy(pipe.transformer)
    lf.merge_lora(reference, distill)
    torch.testing.assert_close(seen["inside"], forward(reference), rtol=1e-4, atol=1e-5)
    assert (seen["inside"] - plain).abs().max() > 1e-3
    # After the call: the trained adapter alone again, and no weight was written.
    assert torch.equal(forward(pipe.transformer), plain)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before_weights[k], after[k]) for k in before_weights)


def test_distill_sampling_takes_every_nth_sigma_of_the_distillation_grid(tiny_pipeline):
    grid = spec.DISTILL_GRID_STEPS
    train = tiny_pipeline.scheduler.config.num_train_timesteps
    for steps in (16, 8, 4):
        sigmas = tiny_pipeline.sampling_sigmas(steps, use_distill=True)
        # Upstream: the grid's sigmas k * (train // grid) / train from the top, every (grid / steps)-th, floored.
        expected = [(grid - (i * grid) // steps) * (train // grid) / train for i in range(steps)]
        assert sigmas == pytest.approx(expected, abs=1e-12) and sigmas[0] == 1.0
    assert tiny_pipeline.sampling_sigmas(16) != tiny_pipeline.sampling_sigmas(16, use_distill=True)
    tiny_pipeline.scheduler.set_timesteps(sigmas=tiny_pipeline.sampling_sigmas(16, use_distill=True))
    shift = tiny_pipeline.scheduler.config.shift
    first = tiny_pipeline.sampling_sigmas(16, use_distill=True)[1]
    # The scheduler's shift (12) applies on top, as in upstream's set_timesteps(sigmas=...).
    assert tiny_pipeline.scheduler.sigmas[1].item() == pytest.approx(shift * first / (1 + (shift - 1) * first))


def test_without_the_key_previews_keep_the_host_values(tiny_pipeline):
    family = preview_family(tiny_pipeline, None)
    kwargs = family.update_pipeline_call_kwargs(host_kwargs())
    assert (kwargs["num_inference_steps"], kwargs["guidance_scale"]) == (40, 4.0) and "use_distill" not in kwargs
    assert not family.supports_multistage_validation()


def test_a_missing_preview_lora_is_named(tiny_pipeline, tmp_path):
    family = preview_family(tiny_pipeline, tmp_path / "lora" / "cfg_step_lora.safetensors")
    with pytest.raises(LongCatVideoError) as info:
        family.update_pipeline_call_kwargs(host_kwargs())
    assert info.value.where == "longcat_validation_distill_lora" and "does not exist" in info.value.rule


# ----------------------------------------------------------------------------------- real host run


def _demo():
    loaded = importlib.util.spec_from_file_location("longcat_demo", REPO / "examples" / "demo.py")
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_host_run_previews_with_the_distill_lora_and_the_final_lora_exports(tmp_path):
    demo = _demo()
    demo.prepare(tmp_path)
    distill = build_tiny_distill_lora(tmp_path / "LongCat-Video-tiny")
    config_path = tmp_path / "config" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(longcat_validation_distill_lora=str(distill), lora_alpha=16)
    config_path.write_text(json.dumps(config))

    code = demo.train(tmp_path, tmp_path / "train.log")
    log = (tmp_path / "train.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    assert f"validation previews use the distillation LoRA {distill}" in log
    sampling = [line for line in log.splitlines() if "LongCat-Video sampling:" in line]
    preview = "16 steps on the distillation grid, guidance 1.00"
    assert sampling and all(preview in line and "CFG" not in line for line in sampling)

    final = tmp_path / "output" / "pytorch_lora_weights.safetensors"
    with safe_open(str(final), "pt") as handle:
        assert lf.adapter_metadata(handle.metadata())["lora_alpha"] == 16
    out = tmp_path / "upstream.safetensors"
    result = export(str(final), "--format", "upstream", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert {v.item() for k, v in load_file(str(out)).items() if k.endswith(".alpha_scale")} == {16 / 8}
