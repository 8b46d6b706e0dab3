"""The plugin's errors. Each names the value, where it came from, the rule broken and the fix."""

from __future__ import annotations

from collections.abc import Sequence


class LongCatVideoError(ValueError):
    """A rule of the LongCat-Video family was broken by a config value, a file or a checkpoint."""

    def __init__(self, *, where: str, value: object, rule: str, fix: str) -> None:
        self.where = where
        self.value = value
        self.rule = rule
        self.fix = fix
        super().__init__(f"{where} = {value!r}: {rule}. Fix: {fix}")


def listed(names: Sequence[object], suffix: str = "", limit: int = 8) -> str:
    """The first ``limit`` names, comma-separated, and how many more there are: long lists stay readable."""
    shown = ", ".join(f"{name}{suffix}" for name in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
