"""Interpreter-start hook, executed by ``simpletuner_longcat_video.pth`` in every process.

It installs one meta-path finder that waits for the host's model registry module
(``simpletuner.helpers.models.registry``) to be imported; right after that module has executed,
the plugin's entry points are registered into it. Until then nothing but ``sys`` is touched, so
a Python process that never imports SimpleTuner pays only for reading this file (the startup
benchmark in ``benchmarks/startup.py`` measures it). Set ``SIMPLETUNER_PLUGINS_DISABLE=1`` to
skip the hook entirely.
"""

import os
import sys

REGISTRY_MODULE = "simpletuner.helpers.models.registry"


class RegistryWatcher:
    """Finds nothing itself; wraps the host's own loader for the registry module."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            on_registry_loaded(module)

        loader.exec_module = exec_module
        return spec


def on_registry_loaded(module) -> None:
    uninstall()
    try:
        from simpletuner_longcat_video import plugin

        plugin.register_entry_points(module)
    except Exception as exc:  # a broken plugin must never take the host down with it
        sys.stderr.write(
            f"[simpletuner-longcat-video] plugin registration failed, the host continues without it: "
            f"{type(exc).__name__}: {exc}\n"
        )


def install() -> None:
    if os.environ.get("SIMPLETUNER_PLUGINS_DISABLE", "").lower() in ("1", "true", "yes"):
        return
    if any(isinstance(finder, RegistryWatcher) for finder in sys.meta_path):
        return
    registry = sys.modules.get(REGISTRY_MODULE)
    if registry is not None:
        on_registry_loaded(registry)
        return
    sys.meta_path.insert(0, RegistryWatcher())


def uninstall() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, RegistryWatcher)]


install()
