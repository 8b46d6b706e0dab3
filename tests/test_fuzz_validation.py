"""Random configs and dataset descriptions: the only exception that may come out is LongCatVideoError.

Whatever a user writes into config.json or multidatabackend.json, the plugin's checks either
accept it or refuse it with the named error; a TypeError, KeyError, AttributeError or
ZeroDivisionError would be a crash the user cannot act on. Derandomised, so CI sees the same
examples every run.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simpletuner_longcat_video import spec
from simpletuner_longcat_video.core.pipeline import check_video_size
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host.datasets import (
    check_datasets,
    check_training_config,
    parse_resolutions,
    prepare_datasets,
)
from simpletuner_longcat_video.host.settings import attention_options_from_config
from simpletuner_longcat_video.spec import check_frames

FUZZ = settings(
    max_examples=150, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)

# Values of any JSON type, biased towards the ones near the rules' edges.
edgy_numbers = st.sampled_from([0, 1, 4, 5, 8, 9, 16, 32, 63, 64, 65, 93, 128, -1, -64, 2**40])
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    edgy_numbers,
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    edgy_numbers.map(str),
)
size_text = st.text(alphabet="0123456789xX,. -+eE", max_size=16)
sizes = st.one_of(
    size_text, st.builds(lambda w, h: f"{w}x{h}", st.integers(-100, 5000), st.integers(-100, 5000)), json_scalars
)


def refused_or_accepted(call, *args) -> object:
    """Run a check: a result or our error are both fine; anything else fails the test."""
    try:
        return call(*args)
    except LongCatVideoError as error:
        assert error.where and error.rule and error.fix
        assert str(error).startswith(f"{error.where} = ")
        return error


@FUZZ
@given(alignment=json_scalars, resolution=sizes, frames=json_scalars)
def test_config_rules_only_raise_our_error(alignment, resolution, frames):
    config = SimpleNamespace(
        aspect_bucket_alignment=alignment, validation_resolution=resolution, validation_num_video_frames=frames
    )
    result = refused_or_accepted(check_training_config, config)
    if result is None:  # accepted: then each rule really holds
        assert alignment is None or int(float(alignment)) in spec.BUCKET_ALIGNMENTS
        if frames is not None:
            assert spec.FRAME_RULE.is_valid(int(frames))
        if resolution:
            assert all(w % 16 == 0 and h % 16 == 0 and w > 0 and h > 0 for w, h in parse_resolutions(resolution))


@FUZZ
@given(frames=json_scalars)
def test_frame_rule_accepts_exactly_the_valid_counts(frames):
    result = refused_or_accepted(check_frames, frames, "num_frames")
    if not isinstance(result, LongCatVideoError):
        assert isinstance(result, int) and result >= 1 and (result - 1) % 4 == 0


@FUZZ
@given(height=st.integers(-64, 4096), width=st.integers(-64, 4096), frames=st.integers(-8, 200))
def test_pipeline_geometry_only_raises_our_error(height, width, frames):
    result = refused_or_accepted(check_video_size, height, width, frames)
    accepted = height > 0 and width > 0 and height % 16 == 0 and width % 16 == 0 and spec.FRAME_RULE.is_valid(frames)
    assert (result is None) == accepted


@FUZZ
@given(
    backend=st.one_of(st.sampled_from(["auto", "sdpa", "block_sparse", "flash", ""]), json_scalars),
    chunk=st.one_of(
        st.builds(lambda *p: ",".join(map(str, p)), *[st.integers(-2, 40)] * 3),
        st.text(alphabet="0123456789,x -", max_size=10),
        json_scalars,
    ),
    sparsity=json_scalars,
    threshold=json_scalars,
)
def test_attention_options_only_raise_our_error(backend, chunk, sparsity, threshold):
    config = SimpleNamespace(
        attention_implementation=backend,
        longcat_bsa_chunk=chunk,
        longcat_bsa_sparsity=sparsity,
        longcat_bsa_cdf_threshold=threshold,
    )
    result = refused_or_accepted(attention_options_from_config, config)
    if not isinstance(result, LongCatVideoError):
        assert result.backend in spec.ATTENTION_IMPLEMENTATIONS
        assert 0.0 <= result.sparsity <= 1.0 and not math.isnan(result.sparsity)
        volume = math.prod(result.chunk)
        assert 16 <= volume <= 256 and volume & (volume - 1) == 0
        assert result.cdf_threshold is None or 0.0 < result.cdf_threshold <= 1.0


# --- dataset descriptions as the host hands them over -----------------------------------------

segment = st.text(alphabet="abcXYZ019_- .", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
stems = st.lists(segment, min_size=1, max_size=3).map("/".join)
suffixes = st.sampled_from([".mp4", ".MP4", ".mov", ".png", ".PNG", ".jpg", ".txt", ""])
file_names = st.lists(st.builds(str.__add__, stems, suffixes), max_size=6, unique=True)


class Metadata:
    def __init__(self, files: list[str]) -> None:
        self.aspect_ratio_bucket_indices = {"1.0": files}
        self.image_metadata = {path: {} for path in files}

    def get_metadata_by_filepath(self, path: str) -> dict | None:
        return self.image_metadata.get(path)


@st.composite
def dataset_descriptions(draw) -> dict:
    """A clip dataset and its start-frame dataset, with random files, types and video settings."""
    # Folders that do not exist: the rules then see only the host's lists (no files to probe).
    clip_root, frame_root = "/nonexistent/clips", "/nonexistent/frames"
    absolute = draw(st.booleans())

    def paths(root: str, names: list[str]) -> list[str]:
        return [f"{root}/{name}" if absolute else name for name in names]

    video = draw(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={"num_frames": json_scalars, "min_frames": json_scalars, "is_i2v": json_scalars},
            ),
        )
    )
    cond = {
        "id": "frames",
        "dataset_type": draw(st.sampled_from(["conditioning", "image", None])),
        "config": {"instance_data_dir": frame_root},
        "metadata_backend": Metadata(paths(frame_root, draw(file_names))),
    }
    clip_settings = {"instance_data_dir": clip_root, "caption_strategy": draw(st.sampled_from(["textfile", None]))}
    if video is not None:
        clip_settings["video"] = video
    if draw(st.booleans()):
        clip_settings["is_i2v"] = draw(json_scalars)
    clip = {
        "id": "clips",
        "dataset_type": draw(st.sampled_from(["video", "image", "conditioning", "text_embeds", None])),
        "config": clip_settings,
        "metadata_backend": Metadata(paths(clip_root, draw(file_names))),
    }
    if draw(st.booleans()):
        clip["conditioning_data"] = [cond]
    return {"clips": clip, "frames": cond}


@FUZZ
@given(backends=dataset_descriptions())
def test_dataset_rules_only_raise_our_error(backends):
    refused_or_accepted(check_datasets, SimpleNamespace(data_backend_config="multidatabackend.json"), backends)


@FUZZ
@given(text=st.one_of(size_text, st.text(max_size=20)))
def test_resolution_parser_only_raises_our_error(text):
    result = refused_or_accepted(parse_resolutions, text)
    if not isinstance(result, LongCatVideoError):
        assert all(isinstance(w, int) and isinstance(h, int) for w, h in result)


# --- multidatabackend.json as the user writes it (before the host configures anything) --------

any_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def config_files(draw) -> list:
    """A data backend config: a clip dataset and a start-frame dataset with random keys and values."""

    def maybe(settings: dict, key: str, values) -> None:
        if draw(st.booleans()):
            settings[key] = draw(values)

    clips = {"id": draw(st.one_of(st.just("clips"), json_scalars))}
    maybe(clips, "dataset_type", st.sampled_from(["video", "image", "conditioning", None]))
    maybe(clips, "type", st.sampled_from(["local", "aws", None]))
    maybe(clips, "instance_data_dir", st.one_of(st.just("/nonexistent/clips"), st.just("relative/clips"), json_scalars))
    maybe(
        clips,
        "video",
        st.one_of(any_json, st.fixed_dictionaries({}, optional={"num_frames": json_scalars, "is_i2v": json_scalars})),
    )
    maybe(clips, "is_i2v", json_scalars)
    maybe(clips, "conditioning_data", st.one_of(st.just(["frames"]), any_json))
    maybe(clips, "resolution", json_scalars)
    maybe(clips, "crop", json_scalars)
    frames = {"id": "frames", "dataset_type": "conditioning", "instance_data_dir": "/nonexistent/frames"}
    maybe(frames, "resolution", json_scalars)
    maybe(frames, "is_i2v", json_scalars)
    return [clips, frames, *draw(st.lists(json_scalars, max_size=2))]


@FUZZ
@given(datasets=config_files())
def test_reading_the_data_backend_config_only_raises_our_error(datasets, tmp_path_factory):
    config = SimpleNamespace(data_backend_config="multidatabackend.json", cache_dir=str(tmp_path_factory.mktemp("c")))
    refused_or_accepted(prepare_datasets, config, datasets)
