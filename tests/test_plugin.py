"""Discovery through an unmodified host: registry precedence, isolation of broken plugins."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

from conftest import run_python

from simpletuner_longcat_video import plugin

OURS = "simpletuner_longcat_video.family:LongCatVideo"


def test_interpreter_start_loads_only_the_hook():
    result = run_python("import json, sys; print(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert "simpletuner_longcat_video._autoload" in loaded, "the .pth hook did not run"
    for heavy in ("torch", "simpletuner", "simpletuner_longcat_video.plugin", "importlib.metadata"):
        assert heavy not in loaded, f"{heavy} imported at interpreter start"


def test_registry_prefers_plugin_even_after_builtin_module_import():
    code = textwrap.dedent(
        """
        import json
        from simpletuner.helpers.models.registry import ModelRegistry
        first = ModelRegistry.get("longcat_video")
        import simpletuner.helpers.models.longcat_video.model as builtin
        after = ModelRegistry.get("longcat_video")
        listed = ModelRegistry.model_families()["longcat_video"]
        real = after
        print(json.dumps({
            "same_object": first is after is listed,
            "is_class": isinstance(real, type),
            "real": f"{real.__module__}:{real.__qualname__}",
            "builtin_class": f"{builtin.LongCatVideo.__module__}:{builtin.LongCatVideo.__qualname__}",
            "text_encoder": real.TEXT_ENCODER_CONFIGURATION["text_encoder"]["model"].__name__,
            "flavours": first.get_flavour_choices(),
        }))
        """
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["same_object"] and report["is_class"]
    assert report["real"] == OURS
    assert report["builtin_class"] != OURS
    assert report["text_encoder"] == "UMT5EncoderModel"
    assert report["flavours"] == ["final"]
    active_lines = [line for line in result.stderr.splitlines() if "is provided by plugin" in line]
    assert len(active_lines) == 1, result.stderr
    assert "replaces the built-in simpletuner.helpers.models.longcat_video.model:LongCatVideo" in active_lines[0]


def _write_broken_plugin(root) -> None:
    dist = root / "broken_plugin-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(
        "[simpletuner.model_families]\n"
        "missing_family = broken_plugin_nowhere.model:Family\n"
        "eager_family = broken_plugin_eager:Family\n"
        "raising_family = broken_plugin_raises.model:Family\n"
    )
    # Without a manifest entry the class is loaded at registration, so its failure shows there.
    (root / "broken_plugin_eager.py").write_text("raise RuntimeError('boom in eager import')\n")
    # With a manifest entry registration is lazy, so the failure shows when the family is used.
    package = root / "broken_plugin_raises"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text("raise RuntimeError('boom at import')\n")
    (package / "plugin_manifest.toml").write_text(
        '[[families]]\nname = "raising_family"\ndisplay_name = "Raising"\n'
        'class = "broken_plugin_raises.model:Family"\nflavours = ["x"]\n'
    )


def test_broken_plugin_leaves_host_usable(tmp_path):
    _write_broken_plugin(tmp_path)
    code = textwrap.dedent(
        """
        import json
        from simpletuner.helpers.models.registry import ModelRegistry
        families = ModelRegistry.model_families()
        # The host's WebUI field registry reads class attributes of every family at import.
        import simpletuner.simpletuner_sdk.server.services.field_registry  # noqa: F401
        try:
            families["raising_family"]("config", "accelerator")
            used = "no error"
        except Exception as exc:
            used = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"families": sorted(families), "used": used}))
        """
    )
    result = run_python(code, PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "longcat_video" in report["families"] and "flux" in report["families"]
    assert "missing_family" not in report["families"] and "eager_family" not in report["families"]
    assert "raising_family" in report["families"]
    assert report["used"].startswith("PluginLoadError: plugin broken-plugin 0.0.1")
    assert "boom at import" in report["used"]
    errors = [line for line in result.stderr.splitlines() if "[ERROR]" in line]
    assert any("broken-plugin 0.0.1" in e and "missing_family" in e and "broken_plugin_nowhere" in e for e in errors)
    assert any("broken-plugin 0.0.1" in e and "eager_family" in e and "boom in eager import" in e for e in errors)
    assert any("broken-plugin 0.0.1" in e and "raising_family" in e and "boom at import" in e for e in errors)


def test_host_outside_supported_range_is_named():
    fake = SimpleNamespace(
        requires=["simpletuner<4.0", "torch>=2.9"],
        metadata={"Name": "simpletuner-longcat-video"},
        version="0.1.0",
    )
    message = plugin._check_host_version(fake)
    assert message is not None
    assert "supports simpletuner<4.0" in message and "4.10.1 is installed" in message
    assert "pip install 'simpletuner<4.0'" in message
    fake.requires = ["simpletuner>=4.10.1,<4.11"]
    assert plugin._check_host_version(fake) is None
