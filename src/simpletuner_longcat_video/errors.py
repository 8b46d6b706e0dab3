"""The plugin's errors. Each names the value, where it came from, the rule broken and the fix."""

from __future__ import annotations


class LongCatVideoError(ValueError):
    """A rule of the LongCat-Video family was broken by a config value, a file or a checkpoint."""

    def __init__(self, *, where: str, value: object, rule: str, fix: str) -> None:
        self.where = where
        self.value = value
        self.rule = rule
        self.fix = fix
        super().__init__(f"{where} = {value!r}: {rule}. Fix: {fix}")
