"""Interpreter-start hook, executed by ``simpletuner_longcat_video.pth`` in every process.

It installs one meta-path finder that waits for the host modules named in :data:`HOOKS`. Right
after one of them has executed, the function of ``simpletuner_longcat_video.host.patches`` that
the table names is called with it: the model registry gets the plugin's family, the field
registry (the source of the host's CLI parser and WebUI forms) its config keys, and the
collation, data backend factory, validation and CLI modules the patches listed in
``docs/plugin.md``. This table is the one place the plugin's changes of the host are applied
from. Until a hooked module loads nothing but ``sys`` is touched, so a Python process that never
imports SimpleTuner pays only for reading this file (``benchmarks/startup.py`` measures it). Set
``SIMPLETUNER_PLUGINS_DISABLE=1`` to skip the hook entirely. Standard library only.
"""

import os
import sys

REGISTRY_MODULE = "simpletuner.helpers.models.registry"
# host module -> function of simpletuner_longcat_video.host.patches called with it once it has executed:
# the one place the plugin's run-time changes of the host are applied from.
HOOKS = {
    REGISTRY_MODULE: "register_family",
    "simpletuner.simpletuner_sdk.server.services.field_registry.registry": "extend_host_fields",
    "simpletuner.helpers.training.collate": "extend_host_collate",
    "simpletuner.helpers.data_backend.factory": "extend_host_data_config",
    "simpletuner.helpers.training.validation": "extend_host_validation",
    "simpletuner.cli": "add_train_config_option",
}
_fired: set = set()


class AfterImport:
    """A meta-path finder that finds nothing itself: it wraps the real loader of each module named
    in ``hooks`` so that ``hooks[name](module)`` runs once, right after that module has executed.

    A spec can be asked for and never used (``importlib.util.find_spec``), so a hook is spent only
    when its module executes; the finder leaves ``sys.meta_path`` once every hook is spent. Also
    the mechanism of the repository's test and benchmark start-up hooks (``sitecustomize`` files).
    """

    def __init__(self, hooks: dict) -> None:
        self.hooks = dict(hooks)

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.hooks:
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
            hook = self.hooks.pop(module.__name__, None)
            if not self.hooks and self in sys.meta_path:
                sys.meta_path.remove(self)
            if hook is not None:
                hook(module)

        loader.exec_module = exec_module
        return spec


class HostModuleWatcher(AfterImport):
    """The plugin's own finder: each host module of :data:`HOOKS` not yet seen -> :func:`on_module_loaded`."""

    def __init__(self) -> None:
        super().__init__({name: on_module_loaded for name in HOOKS if name not in _fired})


def on_module_loaded(module) -> None:
    _fired.add(module.__name__)
    try:
        from simpletuner_longcat_video.host import patches

        getattr(patches, HOOKS[module.__name__])(module)
    except Exception as exc:  # a broken plugin must never take the host down with it
        sys.stderr.write(
            f"[simpletuner-longcat-video] plugin hook for {module.__name__} failed, the host continues "
            f"without it: {type(exc).__name__}: {exc}\n"
        )


def install() -> None:
    if os.environ.get("SIMPLETUNER_PLUGINS_DISABLE", "").lower() in ("1", "true", "yes"):
        return
    if any(isinstance(finder, HostModuleWatcher) for finder in sys.meta_path):
        return
    for name in HOOKS:
        module = sys.modules.get(name)
        if module is not None and name not in _fired:
            on_module_loaded(module)
    if not _fired >= HOOKS.keys():
        sys.meta_path.insert(0, HostModuleWatcher())


install()
