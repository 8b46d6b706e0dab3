"""One source of truth: manifest, entry points, spec.py and the registered class must agree."""

from __future__ import annotations

import tomllib
from importlib import metadata, resources
from pathlib import Path

import pytest

import simpletuner_longcat_video
from simpletuner_longcat_video import spec
from simpletuner_longcat_video.host import discovery

REPO = Path(__file__).resolve().parents[1]
DIST = "simpletuner-longcat-video"


@pytest.fixture(scope="module")
def manifest() -> dict:
    installed = tomllib.loads(
        resources.files("simpletuner_longcat_video").joinpath("plugin_manifest.toml").read_text(encoding="utf-8")
    )
    source = tomllib.loads((REPO / "plugin_manifest.toml").read_text())
    assert installed == source, "installed manifest differs from the checkout's: reinstall (make install)"
    return source


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_plugin_identity(manifest, pyproject):
    assert manifest["plugin"]["name"] == pyproject["project"]["name"] == DIST
    assert manifest["plugin"]["version"] == simpletuner_longcat_video.__version__ == metadata.version(DIST)
    assert manifest["plugin"]["python"] == pyproject["project"]["requires-python"]


def test_host_range_declared_once(manifest, pyproject):
    from packaging.requirements import Requirement

    declared = [Requirement(d) for d in pyproject["project"]["dependencies"] if Requirement(d).name == "simpletuner"]
    wanted = Requirement(manifest["plugin"]["host"])
    assert [(r.name, r.specifier) for r in declared] == [(wanted.name, wanted.specifier)]
    installed = Requirement(spec.host_requirement())
    assert (installed.name, installed.specifier) == (wanted.name, wanted.specifier)


def test_family_entry_points_match_manifest_and_spec(manifest):
    eps = {ep.name: ep.value for ep in metadata.entry_points(group=discovery.FAMILY_GROUP) if ep.dist.name == DIST}
    assert eps == {f["name"]: f["class"] for f in manifest["families"]}
    (family,) = manifest["families"]
    assert family["name"] == spec.FAMILY
    assert family["class"] == spec.FAMILY_CLASS
    assert family["display_name"] == spec.DISPLAY_NAME
    assert family["flavours"] == list(spec.FLAVOURS)
    assert family["default_flavour"] == spec.DEFAULT_FLAVOUR
    assert family["huggingface_paths"] == spec.FLAVOURS
    assert family["text_encoder"] == spec.TEXT_ENCODER_CLASS
    assert family["prediction_type"] == spec.PREDICTION_TYPE
    assert family["tasks"] == list(spec.TASKS)


def test_registered_class_matches_manifest(manifest):
    (family,) = manifest["families"]
    cls = next(ep for ep in metadata.entry_points(group=discovery.FAMILY_GROUP) if ep.name == family["name"]).load()
    assert cls.NAME == family["display_name"]
    assert cls.get_flavour_choices() == family["flavours"]
    assert cls.DEFAULT_MODEL_FLAVOUR == family["default_flavour"]
    assert cls.HUGGINGFACE_PATHS == family["huggingface_paths"]
    assert cls.PREDICTION_TYPE.value == family["prediction_type"]
    assert sorted(p.value for p in cls.PIPELINE_CLASSES) == sorted(family["pipelines"])
    assert cls.TEXT_ENCODER_CONFIGURATION["text_encoder"]["model"].__name__ == family["text_encoder"]
    assert cls.MODEL_CLASS.__module__ == "simpletuner_longcat_video.core.transformer"


def test_attention_backend_entry_points_match_manifest(manifest):
    eps = {ep.name: ep.value for ep in metadata.entry_points(group=discovery.ATTENTION_GROUP) if ep.dist.name == DIST}
    assert eps == {b["name"]: b["object"] for b in manifest["attention_backends"]} == spec.ATTENTION_BACKENDS
    for ep in metadata.entry_points(group=discovery.ATTENTION_GROUP):
        if ep.dist.name == DIST:
            from simpletuner_longcat_video.core.attention import Backend

            backend = ep.load()
            assert isinstance(backend, Backend) and backend.name == ep.name and callable(backend.attend)


def test_kernels_ship_inside_the_installed_package():
    from simpletuner_longcat_video.kernels import block_sparse

    assert "site-packages" in block_sparse.__file__
    assert Path(block_sparse.__file__).parent.parent == Path(simpletuner_longcat_video.__file__).parent
