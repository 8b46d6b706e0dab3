"""docs/troubleshooting.md covers every error the plugin raises.

Each ``LongCatVideoError(...)`` in src/ is found by parsing the source, and the literal parts of
its ``rule=`` text must appear in the troubleshooting page: a new error without a doc entry
fails here. Whatever is in src/ when the test runs is covered, other helpers' errors included.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "simpletuner_longcat_video"
DOC = REPO / "docs" / "troubleshooting.md"


@dataclass(frozen=True)
class RaiseSite:
    path: Path
    line: int
    fragments: tuple[str, ...]  # the literal text of rule=, split where values are filled in

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def _literal_parts(node: ast.expr, constants: dict[str, ast.expr]) -> list[str]:
    """The constant text of a str expression: literals, f-string literals, concatenations, named constants."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        parts: list[str] = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(value.value)
            else:
                parts.append("\0")  # a filled-in value splits the text
        return ["".join(parts)]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _literal_parts(node.left, constants) + ["\0"] + _literal_parts(node.right, constants)
    if isinstance(node, ast.Name) and node.id in constants:
        return _literal_parts(constants[node.id], constants)
    return ["\0"]  # computed text (a join, a call): not a literal part


def _fragments(node: ast.expr, constants: dict[str, ast.expr]) -> tuple[str, ...]:
    text = "".join(_literal_parts(node, constants))
    pieces = (" ".join(piece.split()) for piece in text.split("\0"))
    # Separators such as ", " or "; " say nothing on their own.
    return tuple(piece for piece in pieces if sum(ch.isalnum() for ch in piece) >= 4)


def raise_sites() -> list[RaiseSite]:
    sites = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        constants = {
            target.id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name != "LongCatVideoError":
                continue
            rule = next((keyword.value for keyword in node.keywords if keyword.arg == "rule"), None)
            assert rule is not None, f"{path}:{node.lineno}: LongCatVideoError without rule="
            sites.append(RaiseSite(path, node.lineno, _fragments(rule, constants)))
    return sites


def _normalised(text: str) -> str:
    # The page may wrap, quote and mark up a message; compare words, not layout.
    return " ".join(text.replace("`", "").split())


def test_every_error_has_a_troubleshooting_entry():
    sites = raise_sites()
    assert len(sites) >= 30, "the AST walk found too few raise sites: is SRC right?"
    doc = _normalised(DOC.read_text())
    undocumented = [
        f"{site}: {fragment!r}" for site in sites for fragment in site.fragments if _normalised(fragment) not in doc
    ]
    assert not undocumented, "add these rules to docs/troubleshooting.md:\n" + "\n".join(undocumented)


def test_every_entry_gives_a_fix():
    # Each entry is a table row: the message pattern, then the fix; an empty fix cell is a gap.
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("|") and not re.match(r"\|\s*-", line)]
    body = [row for row in rows if not row.lower().startswith("| message")]
    assert body
    for row in body:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) >= 2 and all(cells), row


def test_the_collector_sees_rule_text_and_skips_filled_in_values():
    tree = ast.parse('LongCatVideoError(where="w", value=1, rule=f"needs {n} frames and " + "more", fix="f")')
    call = tree.body[0].value
    assert _fragments(call.keywords[2].value, {}) == ("needs", "frames and", "more")
