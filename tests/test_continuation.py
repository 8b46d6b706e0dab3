"""Video continuation training: the VAE's causality, the batch, the host's loss, the rules (refused before caching).

The end-to-end run through the real ``simpletuner train`` (mixed I2V / continuation / T2V
datasets, continuation validation) is tests/test_continuation_training.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import AutoencoderKLWan
from simpletuner.helpers.training.state_tracker import StateTracker
from test_training_batch import _family

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.pipeline import normalize_latents
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import datasets, family, patches
from simpletuner_longcat_video.testing.tiny import build_continuation_dataset, build_tiny_dataset, synthetic_clip


def _pixels(frames: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """A clip ``[1, 3, frames, size, size]`` in [-1, 1] whose frames all differ (a square moving over noise)."""
    video = torch.from_numpy(synthetic_clip(seed, frames=frames, height=size, width=size)).float()
    noise = torch.rand(video.shape, generator=torch.Generator().manual_seed(seed)) * 40
    return ((video + noise).clamp(0, 255) / 127.5 - 1.0).permute(3, 0, 1, 2).unsqueeze(0)


def _random_wan_vae() -> AutoencoderKLWan:
    # Every weight random, so the causal 3D convolutions really mix neighbouring frames (the tiny
    # checkpoint's VAE keeps only each convolution's current-frame tap).
    torch.manual_seed(3)
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


@pytest.mark.parametrize("which", ["random", "tiny_checkpoint"])
@torch.no_grad()
def test_the_first_latent_frames_of_a_whole_clip_are_the_encode_of_its_first_k_frames(which, tiny_checkpoint):
    # What makes training (the clip's cached latents, encoded whole) agree with the pipeline (which
    # encodes only the first K frames): the Wan VAE is causal in time.
    vae = _random_wan_vae() if which == "random" else AutoencoderKLWan.from_pretrained(str(tiny_checkpoint / "vae"))
    clip = _pixels(21)
    whole = vae.encode(clip).latent_dist.parameters  # mean and log-variance, [1, 32, 6, h, w]
    for frames in (1, 5, 13):
        count = spec.FRAME_RULE.latent_frames(frames)
        alone = vae.encode(clip[:, :, :frames]).latent_dist.parameters
        assert alone.shape[2] == count
        assert torch.allclose(whole[:, :, :count], alone, atol=1e-5), (
            frames,
            (whole[:, :, :count] - alone).abs().max(),
        )
    # The check can fail: the frames after the 13th change latent frame 4 and leave 0-3 as they were.
    changed = clip.clone()
    changed[:, :, 13:] = -changed[:, :, 13:]
    after = vae.encode(changed).latent_dist.parameters
    assert torch.allclose(after[:, :, :4], whole[:, :, :4], atol=1e-5)
    assert (after[:, :, 4:] - whole[:, :, 4:]).abs().mean() > 1e-3


# --- the training batch, through the family's hook and the host's loss() ------------------------

DATASETS = {
    "cont-13": {"config": {"video": {"num_frames": 21, spec.CONDITION_FRAMES_KEY: 13}}},
    "cont-1": {"config": {"video": {"num_frames": 21, spec.CONDITION_FRAMES_KEY: 1}}},
    "i2v": {"config": {"video": {"num_frames": 21, "is_i2v": True}}},
    "t2v": {"config": {"video": {"num_frames": 21}}},
}


@pytest.fixture(scope="module")
def clip_latents(tiny_checkpoint):
    """Normalised latents ``[2, 16, 6, 4, 4]`` of two 21-frame clips encoded whole, the VAE and the pixels.

    The posterior's mode (the host caches a draw): so that "equal to the encode of the first K
    frames" can be checked to float rounding.
    """
    vae = AutoencoderKLWan.from_pretrained(str(tiny_checkpoint / "vae"))
    with torch.no_grad():
        pixels = torch.cat([_pixels(21, seed) for seed in (0, 1)])
        latents = normalize_latents(vae.encode(pixels).latent_dist.mode(), vae)
    return latents, vae, pixels


@pytest.fixture
def configured(monkeypatch):
    monkeypatch.setattr(StateTracker, "data_backends", DATASETS)


def _model() -> family.LongCatVideo:
    # The host's loss() and the family's batch hook on our family, without loading weights.
    model = _family()
    model.config.weight_dtype = torch.float32
    model.accelerator = SimpleNamespace(device=torch.device("cpu"))
    return model


def _host_batch(latents: torch.Tensor, dataset: str, seed: int = 0) -> dict:
    """What the host's prepare_batch hands the family: clip latents, noise, sigma-mixed latents, [B] timesteps."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.tensor([0.3, 0.8])
    noisy = (1 - sigmas.view(-1, 1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1, 1) * noise
    return {
        "latents": latents.clone(),
        "noise": noise,
        "noisy_latents": noisy,
        "timesteps": sigmas * 1000,
        "sigmas": sigmas,
        "data_backend_id": dataset,
        "filepaths": ["a.mp4", "b.mp4"],
        "encoder_hidden_states": torch.zeros(2, 3, 8),
    }


def check_continuation_batch(model, latents, vae, pixels, frames: int) -> None:
    """The rules of a continuation batch with K = ``frames``; raises AssertionError when one is broken."""
    count = spec.FRAME_RULE.latent_frames(frames)
    host = _host_batch(latents, f"cont-{frames}")
    batch = model.prepare_batch_conditions(
        {key: value.clone() if torch.is_tensor(value) else value for key, value in host.items()}, {}
    )
    assert batch["num_cond_latents"] == count
    # The condition: exactly the clip's own cached latents, clean, at t = 0; and those are the VAE's
    # encode of the first K frames alone (what the pipeline encodes).
    assert torch.equal(batch["noisy_latents"][:, :, :count], latents[:, :, :count])
    with torch.no_grad():
        alone = normalize_latents(vae.encode(pixels[:, :, :frames]).latent_dist.mode(), vae)
    assert torch.allclose(batch["noisy_latents"][:, :, :count], alone, atol=1e-4)
    assert torch.equal(batch["frame_timesteps"][:, :count], torch.zeros(2, count))
    # The rest: the host's noise, at the host's timestep.
    assert torch.equal(batch["noisy_latents"][:, :, count:], host["noisy_latents"][:, :, count:])
    assert (batch["noisy_latents"][:, :, count:] - latents[:, :, count:]).abs().mean() > 0.1
    assert torch.equal(batch["frame_timesteps"][:, count:], host["timesteps"].view(2, 1).expand(2, 6 - count))

    # Through the family's model_predict and the host's loss(): a DiT output exact on the later frames
    # and absurd on the condition frames scores 0; an error of 0.5 on the later frames scores 0.25.
    exact = -(batch["noise"] - batch["latents"])  # the DiT predicts latents - noise; model_predict negates
    exact[:, :, :count] = 1e3
    for error, expected in ((0.0, 0.0), (0.5, 0.25)):
        output = exact.clone()
        output[:, :, count:] -= error
        model.model = lambda output=output, **_: (output,)
        loss = model.loss(batch, model.model_predict(batch))
        assert loss.item() == pytest.approx(expected, abs=1e-6), (frames, error, loss.item())


@pytest.mark.parametrize("frames", [13, 1])
def test_a_continuation_batch_conditions_on_the_clips_own_first_latents(configured, clip_latents, frames):
    latents, vae, pixels = clip_latents
    check_continuation_batch(_model(), latents, vae, pixels, frames)


@pytest.mark.parametrize("mutation", ["noised_condition", "condition_timestep", "condition_in_loss"])
def test_a_broken_continuation_batch_fails_the_check(configured, clip_latents, monkeypatch, mutation):
    latents, vae, pixels = clip_latents
    original = family.apply_continuation_condition
    if mutation == "condition_in_loss":
        monkeypatch.setattr(family, "drop_condition_frames", lambda tensor, batch: tensor)
    else:

        def broken(batch, count):
            host_noisy = batch["noisy_latents"].clone()
            batch = original(batch, count)
            if mutation == "noised_condition":
                batch["noisy_latents"][:, :, :count] = host_noisy[:, :, :count]
            else:
                batch["frame_timesteps"][:, :count] = batch["frame_timesteps"][:, count : count + 1]
            return batch

        monkeypatch.setattr(family, "apply_continuation_condition", broken)
    with pytest.raises(AssertionError):
        check_continuation_batch(_model(), latents, vae, pixels, 13)


def test_each_batch_takes_the_kind_of_its_dataset(configured, clip_latents):
    # The host draws every batch from one dataset and names it (collate's data_backend_id).
    latents = clip_latents[0]
    model = _model()
    start_frames = {"conditioning_latents": torch.randn(2, 16, 1, 4, 4)}
    seen = {}
    for dataset, extra in (("i2v", start_frames), ("cont-13", {}), ("t2v", {}), ("cont-1", {})):
        batch = model.prepare_batch_conditions({**_host_batch(latents, dataset), **extra}, {})
        seen[dataset] = batch["num_cond_latents"]
        if dataset == "i2v":
            assert torch.equal(batch["noisy_latents"][:, :, :1], start_frames["conditioning_latents"])
    assert seen == {"i2v": 1, "cont-13": 4, "t2v": 0, "cont-1": 1}


def test_a_continuation_batch_with_start_frames_or_no_later_frame_is_refused(configured, clip_latents):
    batch = {**_host_batch(clip_latents[0], "cont-13"), "conditioning_latents": torch.randn(2, 16, 1, 4, 4)}
    with pytest.raises(LongCatVideoError, match="not on a start-frame dataset"):
        _model().prepare_batch_conditions(batch, {})
    with pytest.raises(LongCatVideoError, match="latent frames after the condition frames"):
        family.apply_continuation_condition(_host_batch(clip_latents[0][:, :, :4], "cont-13"), 4)


# --- the rules: refused before anything is cached ----------------------------------------------


@pytest.fixture
def run(tmp_path, tiny_checkpoint, monkeypatch):
    """A config folder with a continuation, an I2V and a T2V dataset on real files, and its pre-launch check."""
    monkeypatch.chdir(tmp_path)
    folders = build_tiny_dataset(tmp_path / "datasets" / "i2v", clips=2, val_clips=0, frames=9)
    build_continuation_dataset(tmp_path / "datasets" / "cont" / "train", clips=2, frames=17)
    build_continuation_dataset(tmp_path / "datasets" / "cont" / "val", clips=1, frames=17, offset=300)
    cache = tmp_path / "cache"

    def video(dataset_id: str, folder: Path, frames: int, **extra) -> dict:
        return {
            "id": dataset_id,
            "type": "local",
            "dataset_type": "video",
            "instance_data_dir": str(folder),
            "caption_strategy": "textfile",
            "resolution": 64,
            "resolution_type": "pixel",
            "cache_dir_vae": str(cache / "vae" / dataset_id),
            "video": {"num_frames": frames, "min_frames": frames},
            **extra,
        }

    base = [
        video("cont-train", tmp_path / "datasets/cont/train", 17, longcat_condition_frames=13),
        video("cont-val", tmp_path / "datasets/cont/val", 17, longcat_condition_frames=13),
        video("i2v-train", folders["train_clips"], 9, conditioning_data=["i2v-cond"]),
        {
            "id": "i2v-cond",
            "type": "local",
            "dataset_type": "conditioning",
            "instance_data_dir": str(folders["train_start_frames"]),
            "caption_strategy": None,
            "cache_dir_vae": str(cache / "vae" / "i2v-cond"),
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(cache / "text"),
        },
    ]
    base[2]["video"]["is_i2v"] = True
    config = {
        "model_family": "longcat_video",
        "model_flavour": "final",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(tiny_checkpoint),
        "output_dir": str(tmp_path / "output"),
        "data_backend_config": str(tmp_path / "config" / "multidatabackend.json"),
        "eval_dataset_id": "cont-val",
        "validation_using_datasets": True,
        "validation_num_video_frames": 17,
        "optimizer": "adamw_bf16",
        "lora_rank": 4,
        "mixed_precision": "no",
        "aspect_bucket_alignment": 16,
        "report_to": "none",
    }
    (tmp_path / "config").mkdir()

    def check(edit=None, **overrides) -> tuple[int | None, str]:
        backends = json.loads(json.dumps(base))
        if edit is not None:
            edit({dataset["id"]: dataset for dataset in backends})
        (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(backends))
        (tmp_path / "config" / "config.json").write_text(json.dumps({**config, **overrides}))
        return patches.refuse_bad_config_before_launch(SimpleNamespace(env=None, example=None, args=[]))

    check.cache = cache
    return check


REFUSALS = {
    "not 4k+1": (
        lambda d: d["cont-train"].update(longcat_condition_frames=12),
        {},
        "dataset 'cont-train' longcat_condition_frames = 12: LongCat-Video needs (frames - 1) % 4 == 0",
        "Fix: use 9 or 13",
    ),
    "no frame after it": (
        lambda d: d["cont-train"]["video"].update(num_frames=13, min_frames=13),
        {},
        "dataset 'cont-train' longcat_condition_frames = '13 with video.num_frames/min_frames 13': continuation "
        "needs frames after the condition frames",
        "use clips longer than 13 frames",
    ),
    "image dataset": (
        lambda d: d["i2v-cond"].update(longcat_condition_frames=5),
        {},
        "dataset 'i2v-cond' longcat_condition_frames = \"5 on dataset_type 'conditioning'\": continuation conditions on a "
        "clip's own first frames: only a video dataset has them",
        'move longcat_condition_frames to a "dataset_type": "video" dataset',
    ),
    "start frames too": (
        lambda d: d["i2v-train"].update(longcat_condition_frames=5),
        {},
        "dataset 'i2v-train' longcat_condition_frames = '5 on a dataset with start frames (is_i2v / conditioning_data)': "
        "a dataset trains either image-to-video",
        "a run may mix both kinds of dataset",
    ),
    "two spellings": (
        lambda d: d["cont-train"]["video"].update(longcat_condition_frames=9),
        {},
        "dataset 'cont-train' longcat_condition_frames = '13 beside dataset_type, 9 in video': the two "
        "longcat_condition_frames settings disagree",
        "keep one",
    ),
    "eval K of its own": (
        lambda d: d["cont-val"].update(longcat_condition_frames=9),
        {},
        "dataset 'cont-val' (eval_dataset_id) longcat_condition_frames = '9, training datasets use [13]': validation "
        "continues the eval clips from as many frames as training",
        "give the eval split the K of training (13)",
    ),
    "nothing to render": (
        None,
        {"validation_num_video_frames": 13},
        "dataset 'cont-val' (eval_dataset_id) longcat_condition_frames = '13 with validation_num_video_frames 13'",
        "set validation_num_video_frames above 13",
    ),
    "not a number": (
        lambda d: d["cont-train"].update(longcat_condition_frames="all"),
        {},
        "dataset 'cont-train' longcat_condition_frames = 'all': the continuation condition is a whole number of pixel "
        "frames",
        "use e.g. 13",
    ),
    "config key not 4k+1": (
        None,
        {"longcat_condition_frames": 6},
        "longcat_condition_frames = 6: LongCat-Video needs (frames - 1) % 4 == 0",
        "Fix: use 5 or 9",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_continuation_rule_is_refused_before_launch(run, capsys, case):
    edit, overrides, message, fix = REFUSALS[case]
    assert run() is None  # the config as built passes
    assert run(edit, **overrides) == 1
    printed = " ".join(capsys.readouterr().err.split())
    assert "refused before launch" in printed and message in printed and fix in printed, printed
    assert not run.cache.exists() or not any(path.is_file() for path in run.cache.rglob("*"))


def test_all_dataset_problems_are_named_in_one_error(run, capsys):
    def edit(d):
        d["cont-train"].update(longcat_condition_frames=12)
        d["i2v-cond"].update(longcat_condition_frames=5)

    assert run(edit) == 1
    printed = capsys.readouterr().err
    assert "'2 problems'" in printed and "1. " in printed and "2. " in printed


def test_the_trainer_marks_each_dataset_and_refuses_the_same_rules(run, tmp_path, caplog):
    # The trainer's pass (prepare_datasets, on the list the host will use) writes each dataset's K
    # where the host keeps it for the batch: the video block.
    run()
    config = SimpleNamespace(
        data_backend_config="config/multidatabackend.json",
        cache_dir=str(tmp_path / "cache"),
        eval_dataset_id="cont-val",
        validation_num_video_frames=17,
    )
    backends = json.loads((tmp_path / "config" / "multidatabackend.json").read_text())
    backends[1].pop("longcat_condition_frames")  # the eval split takes the config's value
    with caplog.at_level("INFO"):
        datasets.prepare_datasets(config, backends, condition_frames=13)
    by_id = {dataset["id"]: dataset for dataset in backends}
    assert [datasets.dataset_condition_frames(by_id[name]) for name in ("cont-train", "cont-val", "i2v-train")] == [
        13,
        13,
        0,
    ]
    assert "longcat_condition_frames" not in by_id["cont-train"]  # moved into video
    assert "'i2v-train' stays image-to-video" in caplog.text
    assert "'cont-val': video continuation from each clip's first 13 frames (4 latent frames" in caplog.text
    backends[0]["video"]["longcat_condition_frames"] = 21
    with pytest.raises(LongCatVideoError, match="K must be below every clip's frame count"):
        datasets.prepare_datasets(config, backends, condition_frames=13)


def test_the_config_key_is_a_number_field_the_family_parses(tiny_checkpoint):
    from simpletuner.helpers.configuration.cmd_args import get_argument_parser
    from simpletuner.simpletuner_sdk.server.services.field_registry import field_registry

    from simpletuner_longcat_video.host.settings import global_condition_frames

    field = field_registry.get_field(spec.CONDITION_FRAMES_KEY)
    assert field.field_type.value == "number" and field.tab == "model"
    required = [
        "--model_family=longcat_video",
        "--optimizer=adamw_bf16",
        "--model_type=lora",
        "--output_dir=out",
        "--data_backend_config=d.json",
    ]
    parsed, _ = get_argument_parser().parse_known_args([*required, "--longcat_condition_frames=13"])
    assert global_condition_frames(parsed) == 13
    parsed, _ = get_argument_parser().parse_known_args(required)
    assert global_condition_frames(parsed) == 0


def test_the_dataset_list_of_docs_continuation_md_is_what_it_says():
    # The doc's multidatabackend.json: both splits are continuation datasets with K = 13.
    text = (Path(__file__).resolve().parents[1] / "docs" / "continuation.md").read_text()
    (block,) = [part.split("```", 1)[0] for part in text.split("```json\n")[1:]]
    config = SimpleNamespace(
        data_backend_config="config/multidatabackend.json",
        eval_dataset_id="longcat-video-cont-val",
        validation_using_datasets=True,
        validation_num_video_frames=93,
    )
    plan = datasets.check_continuation_datasets(config, json.loads(block))
    assert plan == {"longcat-video-cont": 13, "longcat-video-cont-val": 13}
