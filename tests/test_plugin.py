"""Discovery through an unmodified host: registry precedence, isolation of broken plugins."""

from __future__ import annotations

import json
import textwrap
from types import SimpleNamespace

from conftest import run_python

from simpletuner_longcat_video.host import discovery

OURS = "simpletuner_longcat_video.host.family:LongCatVideo"


def test_interpreter_start_loads_only_the_hook():
    result = run_python("import json, sys; print(json.dumps(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout))
    assert "simpletuner_longcat_video._autoload" in loaded, "the .pth hook did not run"
    for heavy in ("torch", "simpletuner", "simpletuner_longcat_video.host.discovery", "importlib.metadata"):
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


# Makes the family module fail at import, as a broken install would: its spec resolves (so the
# family is registered, lazily), executing it raises.
BREAK_FAMILY = """
import importlib.abc, importlib.machinery, sys
class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "simpletuner_longcat_video.host.family":
            return importlib.machinery.ModuleSpec(name, self)
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        raise RuntimeError("boom at import")
sys.meta_path.insert(0, _Broken())
"""


def _write_other_plugin(root) -> None:
    # Another distribution declaring a family in the same group: its business, not ours.
    dist = root / "other_plugin-0.0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: other-plugin\nVersion: 0.0.1\n")
    (dist / "entry_points.txt").write_text(f"[{discovery.FAMILY_GROUP}]\nother_family = other_plugin_nowhere:Family\n")


def test_broken_family_module_leaves_host_usable_and_other_packages_alone(tmp_path):
    _write_other_plugin(tmp_path)
    code = BREAK_FAMILY + textwrap.dedent(
        """
        import json
        from simpletuner.helpers.models.registry import ModelRegistry
        from simpletuner_longcat_video.host import discovery
        families = ModelRegistry.model_families()
        # The host's WebUI field registry reads class attributes of every family at import.
        import simpletuner.simpletuner_sdk.server.services.field_registry  # noqa: F401
        try:
            families["longcat_video"]("config", "accelerator")
            used = "no error"
        except Exception as exc:
            used = f"{type(exc).__name__}: {exc}"
        print(json.dumps({"families": sorted(families), "flux": ModelRegistry.get("flux").__name__, "used": used,
                          "targets": sorted(discovery.STATE.targets)}))
        """
    )
    result = run_python(code, PYTHONPATH=str(tmp_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "longcat_video" in report["families"] and report["flux"]
    assert "other_family" not in report["families"] and report["targets"] == ["longcat_video"]
    assert report["used"].startswith("PluginLoadError: plugin simpletuner-longcat-video 0.1.0"), report["used"]
    assert (
        "boom at import" in report["used"] and "uninstall it to get the host's built-in family back" in report["used"]
    )
    errors = [line for line in result.stderr.splitlines() if "[ERROR]" in line]
    assert any("simpletuner-longcat-video" in e and "boom at import" in e for e in errors), result.stderr[-2000:]
    assert not any("other" in e for e in errors)


def test_host_outside_supported_range_is_named():
    fake = SimpleNamespace(
        requires=["simpletuner<4.0", "torch>=2.9"],
        metadata={"Name": "simpletuner-longcat-video"},
        version="0.1.0",
    )
    message = discovery._check_host_version(fake)
    assert message is not None
    assert "supports simpletuner<4.0" in message and "4.10.1 is installed" in message
    assert "pip install 'simpletuner<4.0'" in message
    fake.requires = ["simpletuner>=4.10.1,<4.11"]
    assert discovery._check_host_version(fake) is None
