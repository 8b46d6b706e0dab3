"""The docs tell the truth: their code blocks, commands, files and names are checked against the real host.

Fenced code blocks of the README and both quickstarts are parsed: JSON configs go through the host's
own config parser and the family's rules, dataset lists through the host's dataset validation,
``simpletuner`` command lines through the host's CLI parser, other commands against the repository,
Python blocks against the installed package's signatures. A JSON block that says it is a file
(``<!-- file: examples/config.json -->`` on the line before it) must equal that file; one that says
it is a subset (``<!-- subset: ... -->``) must agree with it key by key.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import json
import re
import shlex
import tomllib
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, run_python

README = REPO / "README.md"
QUICKSTART = REPO / "docs" / "quickstart.md"
QUICKSTART_HI = REPO / "docs" / "quickstart.hi.md"
CHECKED_DOCS = (README, QUICKSTART, QUICKSTART_HI)
# Docs whose `module.name` references must resolve (see docs/architecture.md's first paragraph).
NAMED_DOCS = (REPO / "docs" / "architecture.md", REPO / "docs" / "attention.md")
PACKAGE = "simpletuner_longcat_video"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

FENCE = re.compile(r"^```(\S*)\s*$")
CLAIM = re.compile(r"^<!--\s*(file|subset):\s*(\S+)\s*-->$")
HEADING = re.compile(r"^(#{1,6}) ")
LINK = re.compile(r"\]\(([^)\s]+)\)")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
REPO_TOP = ("examples", "config", "docs", "src", "tests", "tools", "kernels", "benchmarks")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int
    lang: str
    body: str
    claim: tuple[str, str] | None

    def __str__(self) -> str:
        return f"{self.doc}:{self.line} ({self.lang or 'no language'})"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@functools.cache
def code_blocks(path: Path) -> tuple[Block, ...]:
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, previous, index = [], "", 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if match:
            start, body = index, []
            index += 1
            while index < len(lines) and not lines[index].startswith("```"):
                body.append(lines[index])
                index += 1
            assert index < len(lines), f"{_rel(path)}:{start + 1}: code block never closed"
            claim = CLAIM.match(previous)
            blocks.append(
                Block(_rel(path), start + 1, match.group(1), "\n".join(body), claim.groups() if claim else None)
            )
            previous = ""
        elif lines[index].strip():
            previous = lines[index].strip()
        index += 1
    return tuple(blocks)


def prose(path: Path) -> str:
    """The text outside fenced code blocks."""
    kept, inside = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            inside = not inside
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


def blocks_of(lang: str) -> list[Block]:
    return [block for path in CHECKED_DOCS for block in code_blocks(path) if block.lang == lang]


def shell_commands() -> list[tuple[Block, list[str]]]:
    commands = []
    for block in blocks_of("bash"):
        for line in block.body.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append((block, argv))
    return commands


def json_documents() -> list[tuple[Block, object]]:
    documents = []
    for block in blocks_of("json"):
        try:
            documents.append((block, json.loads(block.body)))
        except json.JSONDecodeError as error:
            pytest.fail(f"{block}: not valid JSON: {error}")
    return documents


# One interpreter of the project environment answers every question for the host (its import is the
# slow part), the way `simpletuner train` would: configs through its config parser, dataset lists
# through its dataset validation, command lines through its CLI parser.
HOST_CHECK = r"""
import contextlib, importlib, io, json
payload = json.loads(PAYLOAD)
from simpletuner.helpers.configuration.cmd_args import parse_cmdline_args
from simpletuner.helpers.configuration.json_file import normalize_args
from simpletuner.helpers.data_backend.config import create_backend_config
from simpletuner.helpers.data_backend.config_rules import _validate_dataloader_specific
from simpletuner.cli import create_parser
from simpletuner.helpers.training.validation import parse_validation_resolution
from simpletuner_longcat_video.host.datasets import check_training_config

def attempt(call):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            value = call()
        return {"ok": True, "value": value}
    except SystemExit as exc:
        return {"ok": False, "error": f"exit {exc.code}: {err.getvalue()[-600:]}"}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

def config(cfg):
    namespace = parse_cmdline_args(input_args=normalize_args(cfg), exit_on_error=False)
    if namespace is None:
        raise ValueError("the host's parser returned nothing")
    check_training_config(namespace)
    return {key: str(value) for key, value in sorted(vars(namespace).items())}

def datasets(blocks):
    base = {"model_family": "longcat_video", "model_flavour": "final", "model_type": "lora", "framerate": 16}
    for block in blocks:
        create_backend_config(dict(block), dict(base)).validate(dict(base))
    problems = [r.message for r in _validate_dataloader_specific({"datasets": blocks}) if r.level == "error"]
    if problems:
        raise ValueError("; ".join(problems))
    return len(blocks)

def resolve(name):
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return type(obj).__name__

out = {
    "configs": [attempt(lambda c=c: config(c)) for c in payload["configs"]],
    "datasets": [attempt(lambda d=d: datasets(d)) for d in payload["datasets"]],
    "cli": [attempt(lambda a=a: str(create_parser().parse_args(a))) for a in payload["cli"]],
    "names": [attempt(lambda n=n: resolve(n)) for n in payload["names"]],
    "resolution": attempt(lambda: list(parse_validation_resolution("832x480", model_flavour="final"))),
    "seed": {
        "bare": attempt(lambda: config(payload["seed"]["bare"])),
        "filled": attempt(lambda: config(payload["seed"]["filled"])),
        "resolution": attempt(
            lambda: list(parse_validation_resolution(payload["seed"]["bare"]["validation_resolution"], model_flavour="final"))
        ),
    },
}
with open(OUT, "w") as handle:  # not stdout: the host's logging writes there, with colour codes
    json.dump(out, handle)
"""


# The seed's config.json (../shared/seed/README.md, section 2: the example's keys, plus what its
# set-up says to fill in after `cp config/config.json.example config/config.json`: model_family,
# model_flavour, output_dir, data_backend_config, eval_dataset_id).
SEED_CONFIG = {
    "model_family": "longcat_video",
    "model_flavour": "final",
    "model_type": "lora",
    "output_dir": "output/longcat-video-i2v",
    "data_backend_config": "config/multidatabackend.json",
    "train_batch_size": 1,
    "gradient_checkpointing": True,
    "lora_rank": 8,
    "learning_rate": 1e-4,
    "validation_resolution": "480x832",
    "validation_num_video_frames": 93,
    "validation_num_inference_steps": 40,
    "validation_guidance": 4.0,
    "validation_using_datasets": True,
    "eval_dataset_id": "longcat-video-val",
}


def host_names() -> list[str]:
    groups = set(PYPROJECT["project"]["entry-points"])
    found = set()
    for path in NAMED_DOCS:
        for token in _named(path):
            if re.fullmatch(r"simpletuner\.[\w.]+", token) and token not in groups:
                found.add(token)
    return sorted(found)


def _named(path: Path) -> set[str]:
    """Dotted names in inline code (a call's arguments dropped) and in the ``text`` diagrams."""
    inline = [token.split("(")[0] for token in INLINE.findall(prose(path))]
    diagrams = [
        word for block in code_blocks(path) if block.lang == "text" for word in re.findall(r"[\w.]+", block.body)
    ]
    return {name.rstrip(".") for name in inline + diagrams}


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> dict:
    configs = [doc for _, doc in json_documents() if isinstance(doc, dict)]
    dataset_lists = [doc for _, doc in json_documents() if isinstance(doc, list)]
    cli = [argv[1:] for _, argv in shell_commands() if argv[0] == "simpletuner"]
    seed_train = ["train", "--config", "config/config.json"]  # the seed's command (docs/quickstart.md §8)
    payload = {
        "configs": configs,
        "datasets": dataset_lists,
        "cli": [*cli, seed_train],
        "names": host_names(),
        # The seed's set-up: copy the example file, then fill in (here: every value the seed names).
        "seed": {
            "bare": SEED_CONFIG,
            "filled": {**json.loads((REPO / "examples" / "config.json").read_text()), **SEED_CONFIG},
        },
    }
    out = tmp_path_factory.mktemp("host-check") / "answers.json"
    code = f"PAYLOAD = {json.dumps(json.dumps(payload))}\nOUT = {str(out)!r}\n{HOST_CHECK}"
    result = run_python(code, timeout=600)
    assert out.is_file(), result.stdout[-3000:] + result.stderr[-3000:]
    answers = json.loads(out.read_text())
    answers["inputs"] = payload
    return answers


def test_readme_opens_with_the_two_commands():
    lines = README.read_text(encoding="utf-8").splitlines()
    first = code_blocks(README)[0]
    assert lines[0].startswith("# ") and all(not line.strip() for line in lines[1 : first.line - 1])
    commands = [shlex.split(line, comments=True) for line in first.body.splitlines()]
    assert first.lang == "bash" and commands == [["make", "demo"], ["make", "test"]]


def test_every_json_block_is_a_claimed_file_or_subset():
    documents = json_documents()
    assert {block.doc for block, _ in documents} == {_rel(path) for path in CHECKED_DOCS}
    for block, document in documents:
        assert block.claim is not None, f"{block}: say which file it is (<!-- file: ... --> or <!-- subset: ... -->)"
        kind, name = block.claim
        source = json.loads((REPO / name).read_text())
        if kind == "file":
            assert document == source, f"{block} differs from {name}"
        else:
            assert isinstance(document, dict) and document, block
            assert {key: source.get(key, "<absent>") for key in document} == document, f"{block} vs {name}"


def test_the_cp_targets_are_the_files_the_quickstart_shows():
    copies = {argv[2]: argv[1] for _, argv in shell_commands() if argv[0] == "cp"}
    shown = {block.claim[1] for block, _ in json_documents() if block.claim and block.claim[0] == "file"}
    assert shown == {"examples/config.json", "examples/multidatabackend.json"}
    for example in shown:
        name = Path(example).name
        assert copies.get(f"config/{name}") == f"config/{name}.example"
        assert (REPO / "config" / f"{name}.example").read_text() == (REPO / example).read_text()


def test_every_config_block_passes_the_host_parser_and_the_family_rules(host):
    configs = host["inputs"]["configs"]
    assert len(configs) >= 3  # the quickstart's config.json (EN, HI) and the README's subset
    for config, answer in zip(configs, host["configs"], strict=True):
        assert answer["ok"], f"{sorted(config)}: {answer['error']}"
        parsed = answer["value"]
        assert parsed["model_family"] == "longcat_video" and parsed["model_flavour"] == "final"
        for key in ("lora_rank", "validation_num_video_frames", "attention_implementation"):
            if key in config:
                assert parsed[key] == str(config[key]), key


def test_every_dataset_block_is_known_to_the_host(host):
    known = _host_dataset_keys()
    lists = host["inputs"]["datasets"]
    assert lists, "the quickstart shows its multidatabackend.json"
    for datasets, answer in zip(lists, host["datasets"], strict=True):
        assert answer["ok"], answer["error"]
        for dataset in datasets:
            keys = set(dataset) | set(dataset.get("video") or {})
            assert keys <= known, f"{dataset['id']}: keys the host never reads: {sorted(keys - known)}"


@functools.cache
def _host_dataset_keys() -> frozenset[str]:
    """Every string the host's data-backend code reads as a key (``.get("k")``, ``["k"]``, ``"k" in``)."""
    spec = importlib.util.find_spec("simpletuner")  # locates the package without importing it
    root = Path(next(iter(spec.submodule_search_locations))) / "helpers" / "data_backend"
    keys = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            key = None
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                key = node.args[0] if node.func.attr in ("get", "pop", "setdefault") else None
            elif isinstance(node, ast.Subscript):
                key = node.slice
            elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops):
                key = node.left
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                keys.add(key.value)
    return frozenset(keys)


def test_host_dataset_key_scan_tells_known_from_unknown():
    known = _host_dataset_keys()
    assert {"cache_dir_vae", "conditioning_data", "is_i2v", "instance_data_dir"} <= known
    assert not {"cache_dir_vea", "is_i2vv", "conditioning_dataset"} & known


def test_every_simpletuner_command_parses_with_the_host_cli(host):
    argvs = host["inputs"]["cli"]
    assert ["train", "--config", "config/config.json"] in argvs[:-1] and ["server"] in argvs
    # The last one is the seed's own command, checked even if the docs stopped showing it: the
    # plugin adds `--config` to SimpleTuner 4.10.1's parser (tests/test_host_cli.py runs it).
    for argv, answer in zip(argvs, host["cli"], strict=True):
        assert answer["ok"], f"simpletuner {shlex.join(argv)}: {answer['error']}"


def test_validation_resolution_is_width_by_height_as_the_quickstart_says(host):
    assert host["resolution"] == {"ok": True, "value": [832, 480]}
    assert json.loads((REPO / "examples" / "config.json").read_text())["validation_resolution"] == "832x480"


def test_the_seeds_config_is_accepted_and_its_resolution_reads_as_portrait(host):
    # The seed's values in the copied example file: accepted by the host's parser and the family's rules...
    answer = host["seed"]["filled"]
    assert answer["ok"], answer["error"]
    parsed = answer["value"]
    for key in ("model_family", "model_flavour", "model_type", "eval_dataset_id", "validation_resolution"):
        assert parsed[key] == str(SEED_CONFIG[key]), key
    assert int(parsed["lora_rank"]) == 8 and int(parsed["validation_num_video_frames"]) == 93
    assert float(parsed["validation_guidance"]) == 4.0 and parsed["validation_using_datasets"] == "True"
    # ...with the one difference quickstart section 8 names: SimpleTuner reads WIDTHxHEIGHT, so the
    # seed's "480x832" renders 480 wide and 832 high (portrait); the shipped config says "832x480".
    assert host["seed"]["resolution"] == {"ok": True, "value": [480, 832]}
    assert '| `validation_resolution: "480x832"` | `"832x480"` |' in QUICKSTART.read_text()
    # The seed's keys alone are not a whole config: the host itself refuses them, naming the key
    # the example file supplies (docs/troubleshooting.md says so).
    assert not host["seed"]["bare"]["ok"]
    assert "the following arguments are required: --optimizer" in host["seed"]["bare"]["error"]


def _make_targets() -> set[str]:
    return set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(), flags=re.M))


def test_every_other_command_names_something_that_exists():
    checked = 0
    for block, argv in shell_commands():
        program, args = argv[0], argv[1:]
        where = f"{block}: {shlex.join(argv)}"
        if program == "simpletuner":
            continue  # the host's CLI parser checks these
        elif program == "make":
            assert args and set(args) <= _make_targets(), where
        elif program == "cp":
            assert len(args) == 2 and (REPO / args[0]).is_file() and (REPO / args[1]).parent.is_dir(), where
        elif program == "pip":
            assert args[0] == "install" and [a for a in args[1:] if not a.startswith("-")] == [
                PYPROJECT["project"]["name"]
            ], where
        elif program == "python" and args[:1] == ["-m"]:
            spec = importlib.util.find_spec(args[1])
            assert spec is not None and spec.origin, where
            assert '__name__ == "__main__"' in Path(spec.origin).read_text(), f"{where}: no main block"
        elif program == "python":
            assert (REPO / args[0]).is_file(), where
        else:
            pytest.fail(f"{where}: no check for {program!r} in tests/test_docs.py; add one")
        checked += 1
    assert checked >= 4


def test_python_blocks_call_what_the_package_offers():
    blocks = blocks_of("python")
    assert blocks
    for block in blocks:
        tree = ast.parse(block.body)
        names: dict[str, object] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    names[alias.asname or alias.name] = _import_from(node.module, alias.name, block)
        kinds: dict[str, type] = {}  # variables assigned from calls with a known return type
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                func = node.value.func
                if isinstance(func, ast.Name) and inspect.isfunction(names.get(func.id)):
                    returned = typing.get_type_hints(names[func.id]).get("return")
                    if isinstance(returned, type):
                        kinds.update({target.id: returned for target in node.targets if isinstance(target, ast.Name)})
        bound = 0
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            target = _callable_for(node.func, names, kinds)
            if target is None:
                continue
            positional = [None] * len(node.args)
            keywords = {kw.arg: None for kw in node.keywords if kw.arg}
            try:
                inspect.signature(target).bind(*positional, **keywords)
            except TypeError as error:
                pytest.fail(f"{block}: {ast.unparse(node.func)}(...) does not match {target}: {error}")
            bound += 1
        assert bound >= 3, f"{block}: expected the package's calls to be checked, bound {bound}"


def _import_from(module_name: str, name: str, block: Block) -> object:
    """What ``from module_name import name`` binds: an attribute, or else a submodule."""
    module = importlib.import_module(module_name)
    if hasattr(module, name):
        return getattr(module, name)
    try:
        return importlib.import_module(f"{module_name}.{name}")
    except ImportError:
        pytest.fail(f"{block}: `from {module_name} import {name}` fails")


def _callable_for(func: ast.expr, names: dict[str, object], kinds: dict[str, type]) -> object | None:
    if isinstance(func, ast.Name) and func.id in kinds:
        return functools.partial(kinds[func.id].__call__, None)
    if isinstance(func, ast.Name) and inspect.isfunction(names.get(func.id)):
        return names[func.id]
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in kinds:
        cls = kinds[func.value.id]
        assert hasattr(cls, func.attr), f"{cls.__name__} has no {func.attr}"
        method = inspect.getattr_static(cls, func.attr)
        return (
            functools.partial(getattr(cls, func.attr), None) if inspect.isfunction(method) else getattr(cls, func.attr)
        )
    return None


def _is_repo_path(token: str) -> bool:
    return bool(re.fullmatch(r"[\w./-]+", token)) and token.split("/")[0] in REPO_TOP and "/" in token


def test_paths_and_links_in_the_docs_exist():
    created = {argv[2] for _, argv in shell_commands() if argv[0] == "cp"}
    for path in (*CHECKED_DOCS, *NAMED_DOCS):
        text = prose(path)
        for token in INLINE.findall(text):
            if _is_repo_path(token) and token not in created:
                assert (REPO / token).exists(), f"{_rel(path)} names `{token}`, which does not exist"
        for target in LINK.findall(text):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            file = target.split("#", 1)[0]
            assert (path.parent / file).exists(), f"{_rel(path)} links to {target}, which does not exist"


def test_readme_links_every_doc():
    linked = {(README.parent / target.split("#", 1)[0]).resolve() for target in LINK.findall(README.read_text())}
    missing = [_rel(doc) for doc in sorted((REPO / "docs").glob("*.md")) if doc.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        return False


def _package_object(token: str) -> object | None:
    """``token`` (``core.attention.Backend``, ``spec.FRAME_RULE``) resolved in the package, or None if
    its first part names no module or subpackage of it."""
    root = REPO / "src" / PACKAGE
    heads = {path.stem for path in root.glob("*.py")} | {path.name for path in root.iterdir() if path.is_dir()}
    heads |= {"kernels"}
    parts = token.split(".")
    if parts[0] not in heads or len(parts) < 2 or token.endswith(".py"):
        return None
    cut = 1
    while cut < len(parts) and _is_module(f"{PACKAGE}.{'.'.join(parts[: cut + 1])}"):
        cut += 1
    obj = importlib.import_module(f"{PACKAGE}.{'.'.join(parts[:cut])}")
    for attr in parts[cut:]:
        assert hasattr(obj, attr), f"`{token}`: {obj.__name__} has no {attr}"
        obj = getattr(obj, attr)
    return obj


def test_named_package_objects_exist():
    checked = 0
    for path in NAMED_DOCS:
        for token in _named(path):
            try:
                found = _package_object(token)
            except AssertionError as error:
                raise AssertionError(f"{_rel(path)} names {error}") from None
            checked += found is not None
    assert checked >= 30


def test_named_host_objects_exist(host):
    names = host["inputs"]["names"]
    assert len(names) >= 8
    for name, answer in zip(names, host["names"], strict=True):
        assert answer["ok"], f"{name}: {answer['error']}"


def _sections(path: Path) -> list[str]:
    return [match.group(1) for line in prose(path).splitlines() if (match := HEADING.match(line))]


def test_hindi_quickstart_matches_the_english_one():
    english, hindi = code_blocks(QUICKSTART), code_blocks(QUICKSTART_HI)
    assert [(b.lang, b.body, b.claim) for b in hindi] == [(b.lang, b.body, b.claim) for b in english]
    assert _sections(QUICKSTART_HI) == _sections(QUICKSTART)
    # The same links, each version pointing at the other language.
    swap = {"quickstart.md": "quickstart.hi.md"}
    assert sorted(swap.get(t, t) for t in LINK.findall(prose(QUICKSTART_HI))) == sorted(LINK.findall(prose(QUICKSTART)))
    words = INLINE.sub("", LINK.sub("", prose(QUICKSTART_HI)))
    devanagari = sum(1 for char in words if "\u0900" <= char <= "\u097f")
    assert devanagari > 0.5 * sum(1 for char in words if char.isalpha()), "the Hindi quickstart is mostly not Hindi"
