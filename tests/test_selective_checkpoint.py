"""Selective activation checkpointing (``longcat_checkpoint_saves``): each level keeps what it says and
changes no number.

What a level keeps is checked by what the backward *executes*: a dispatch mode entered around
``backward()`` sits below the checkpoint's own modes, so it sees an op only when the op really runs
again (a kept op is answered from the checkpoint's store and never reaches it). The counts are taken
against the same model without checkpointing (whose backward runs no forward op), and the ops are
told apart by their shapes in the tiny DiT, independently of the product's own classifier.

The block-sparse kernels (Triton, under TRITON_INTERPRET=1 on CPU) run in a fresh interpreter, this
file run as a script (see test_kernels_block_sparse.py for why); the tests assert on its report.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from _tiny_dit import TINY, i2v_batch, i2v_loss, lora_dit, take_lora_grads
from torch.utils._python_dispatch import TorchDispatchMode

HIDDEN, FFN = 64, 256  # the tiny DiT's FFN width: 2/3 of 4 * 64, rounded up to 256
TEXT_TOKENS = 4  # valid prompt tokens in _inputs (padding is dropped before cross-attention)
LEVELS = ("none", "attention", "attention+proj", "attention+ffn")
# Block-sparse settings the tiny grid tiles: 3x4x4 tokens, chunks of (1, 4, 4), the noisy queries keep 1 of 3.
BSA_OPTIONS = dict(backend="block_sparse", sparsity=0.5, chunk=(1, 4, 4))

# Forward ops one checkpointed block runs again in the backward, per level (eager): self-attention
# twice (the condition frame's call and the noisy queries'), cross-attention once, the three
# hidden-wide matmuls (attention output projection, cross-attention query and output projections),
# the FFN's two up-projections and its down-projection.
FULL = {"self-attention": 2, "cross-attention": 1, "hidden-wide": 3, "ffn-up": 2, "ffn-down": 1}
RECOMPUTED = {
    "none": FULL,
    "attention": {**FULL, "self-attention": 0},
    "attention+proj": {**FULL, "self-attention": 0, "hidden-wide": 0, "ffn-down": 0},
    "attention+ffn": {**FULL, "self-attention": 0, "ffn-up": 0, "ffn-down": 0},
}


def _compiled_recomputed(level: str) -> dict[str, int]:
    # A compiled region recomputes only what the backward reads: the FFN's output feeds nothing but
    # the residual add, so no level runs the down-projection again.
    return {**RECOMPUTED[level], "ffn-down": 0}


def _kind(op: object, args: tuple) -> str | None:
    name = str(op)
    if name.startswith("longcat_bsa.forward"):
        return "self-attention"
    if "scaled_dot_product" in name and "backward" not in name:
        return "cross-attention" if args[1].shape[-2] == TEXT_TOKENS else "self-attention"
    if name in ("aten.mm.default", "aten.addmm.default"):
        left, right = args[-2], args[-1]
        shapes = {(HIDDEN, HIDDEN): "hidden-wide", (HIDDEN, FFN): "ffn-up", (FFN, HIDDEN): "ffn-down"}
        return shapes.get((left.shape[-1], right.shape[-1]))
    return None


class Executions(TorchDispatchMode):
    """Counts the forward ops that really execute while it is active (see the module docstring)."""

    supports_higher_order_operators = True

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # compiled code runs as compiled; its graphs' ops still dispatch (aot_eager)

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        op, op_args = func, args
        if func is torch.ops.higher_order.run_with_rng_state:
            # A compiled recomputation of an op that carries RNG state (SDPA): (state, op, *args).
            op, op_args = args[1], args[2:]
        kind = _kind(op, op_args)
        if kind is not None:
            self.counts[kind] += 1
        return func(*args, **(kwargs or {}))


def _model(level: str | None, backend: str = "sdpa", depth: int = TINY["depth"]):
    model = lora_dit(depth=depth)
    model.set_attention_options(**{**BSA_OPTIONS, "backend": backend})
    if level is not None:
        model.enable_gradient_checkpointing()
        model.set_checkpoint_saves(level)
    return model


class _Launches:
    """Counts the Triton forward launches (the real kernels run, not a kept output handed back)."""

    def __init__(self) -> None:
        from simpletuner_longcat_video.kernels import triton_bsa

        self.forward = 0
        launch = triton_bsa.bsa_forward

        def counted(*args, **kwargs):
            self.forward += 1
            return launch(*args, **kwargs)

        triton_bsa.bsa_forward = counted


def _step(model, launches: _Launches | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Loss, output and gradients of one I2V step, and what its backward executed: the forward ops
    (``Executions``), or with ``launches`` the block-sparse forward kernel launches before and in it."""
    before = launches.forward if launches is not None else 0
    latents, *rest = i2v_batch()
    latents.requires_grad_()
    out, loss = i2v_loss(model, (latents, *rest))
    if launches is None:
        executions = Executions()
        with executions:
            loss.backward()
        counts: dict = executions.counts
    else:
        in_forward = launches.forward - before
        loss.backward()
        counts = {"forward": in_forward, "backward": launches.forward - before - in_forward}
    return {"loss": loss.detach(), "out": out.detach(), "latents.grad": latents.grad, **take_lora_grads(model)}, counts


def _recomputed(counts: collections.Counter, baseline: collections.Counter, depth: int) -> dict[str, float]:
    """Forward ops run again per block: the checkpointed backward's executions less the plain backward's."""
    return {kind: (counts[kind] - baseline[kind]) / depth for kind in FULL}


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# In this process: SDPA (eager and compiled), the host's memory mechanisms, the config.


@pytest.fixture(scope="module")
def plain_step():
    return _step(_model(None))


@pytest.fixture(scope="module")
def plain_step_one_block():
    return _step(_model(None, depth=1))


@pytest.fixture(scope="module")
def plain_step_four_blocks():
    return _step(_model(None, depth=4))


def _assert_same_step(got: dict, ref: dict, rtol: float) -> None:
    assert got.keys() == ref.keys() and len(ref) > 4
    for name, value in ref.items():
        assert _rel(got[name], value) <= rtol, f"{name}: relative difference {_rel(got[name], value):.2e}"


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_keeps_what_it_says_and_changes_no_gradient(plain_step, level):
    ref, baseline = plain_step
    got, counts = _step(_model(level))
    # Kept outputs are the very tensors the forward made: the step is the same to float32 rounding.
    _assert_same_step(got, ref, rtol=1e-6)
    assert _recomputed(counts, baseline, TINY["depth"]) == RECOMPUTED[level]


# "none" with compiled blocks is the checkpoint around each compiled block, as before this option
# (test_memory_options.test_compiled_blocks_give_the_same_step).
@pytest.mark.parametrize("level", LEVELS[1:])
def test_each_level_with_compiled_blocks(plain_step_one_block, level):
    from torch._dynamo.utils import counters

    ref, baseline = plain_step_one_block
    # One block: compiling is what costs here. "auto" (SDPA on a CPU) traces the seam's choice too.
    model = _model(level, "auto", depth=1)
    counters.clear()
    model.compile_blocks(backend="aot_eager")  # AOTAutograd's partitioner, as Inductor uses it
    first, _ = _step(model)
    got, counts = _step(model)  # the compiled graph again
    for step in (first, got):
        _assert_same_step(step, ref, rtol=1e-5)  # aot_eager may reorder LoRA sums
    assert _recomputed(counts, baseline, 1) == _compiled_recomputed(level)
    # One graph, no break: the block under its selective checkpoint.
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1
    # Another region with the same level (another block, another model) runs the same graph: with 48
    # blocks, a graph per block would pass Dynamo's recompile limit and leave the rest uncompiled.
    again = _model(level, "auto", depth=1)
    again.compile_blocks(backend="aot_eager")
    _assert_same_step(_step(again)[0], ref, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1


def test_unsloth_offload_and_block_swap_keep_the_attention_too(plain_step):
    from simpletuner_longcat_video.host import family  # noqa: F401  (hands the DiT the host's parts)

    ref, baseline = plain_step
    offloaded = _model("attention")
    offloaded.set_gradient_checkpointing_backend("unsloth")
    swapped = _model("attention")
    # "cpu:0" is another torch.device than "cpu": the host's manager runs its real protocol (see
    # test_memory_options); its moves are no-ops on one CPU.
    swapped.enable_block_swap(1, "cpu:0")
    for model in (offloaded, swapped):
        got, counts = _step(model)
        _assert_same_step(got, ref, rtol=1e-6)
        assert _recomputed(counts, baseline, TINY["depth"]) == RECOMPUTED["attention"]


@pytest.mark.parametrize(
    ("interval", "stride", "level", "plan"),
    [
        (2, None, "none", [(range(0, 2), True), (range(2, 4), True)]),
        (2, 3, "none", [(range(0, 2), True), (range(2, 3), False), (range(3, 4), True)]),
        (None, 2, "none", [(range(0, 1), True), (range(1, 2), False), (range(2, 3), True), (range(3, 4), False)]),
        (2, 3, "attention", [(range(0, 2), True), (range(2, 3), False), (range(3, 4), True)]),
    ],
)
def test_checkpoint_interval_groups_blocks_and_changes_no_gradient(
    plain_step_four_blocks, interval, stride, level, plan
):
    ref, baseline = plain_step_four_blocks
    model = _model(level, depth=4)
    model.set_gradient_checkpointing_interval(interval)
    model.set_gradient_checkpointing_segment_stride(stride)
    assert model.checkpoint_plan() == plan
    got, counts = _step(model)
    _assert_same_step(got, ref, rtol=1e-6)
    # Only checkpointed blocks run again (a block between regions keeps everything), and a region of
    # several blocks still keeps what its level says.
    checkpointed = sum(len(run) for run, is_checkpointed in plan if is_checkpointed)
    recomputed = _recomputed(counts, baseline, 1)
    assert recomputed == {kind: per_block * checkpointed for kind, per_block in RECOMPUTED[level].items()}


def test_levels_and_interval_refuse_bad_values_by_name():
    from simpletuner_longcat_video.errors import LongCatVideoError

    model = _model("none")
    with pytest.raises(LongCatVideoError, match=r"longcat_checkpoint_saves = 'everything': must be one of \['none'"):
        model.set_checkpoint_saves("everything")
    with pytest.raises(LongCatVideoError, match=r"gradient_checkpointing_interval = 0: must be a whole number"):
        model.set_gradient_checkpointing_interval(0)
    model.set_gradient_checkpointing_interval(3)
    model.set_gradient_checkpointing_segment_stride(2)
    with pytest.raises(LongCatVideoError, match=r"gradient_checkpointing_segment_stride = 2: must be at least .*\(3\)"):
        model.checkpoint_plan()


def test_block_swap_refuses_a_checkpoint_of_several_blocks():
    from simpletuner_longcat_video.errors import LongCatVideoError
    from simpletuner_longcat_video.host import family  # noqa: F401

    model = _model("none")
    model.enable_block_swap(1, "cpu:0")
    model.set_gradient_checkpointing_interval(2)
    with pytest.raises(LongCatVideoError, match=r"gradient_checkpointing_interval = '2 with musubi_blocks_to_swap'"):
        _step(model)


def test_the_host_hands_its_interval_and_backend_to_the_dit():
    # SimpleTuner 4.10.1 calls set_gradient_checkpointing_interval / _segment_stride / _backend only on
    # models that have them (else it logs that the value is ignored): the names must be the host's.
    from simpletuner.helpers.models.common import ModelFoundation

    model = _model("none")
    config = SimpleNamespace(
        gradient_checkpointing_backend="torch",
        gradient_checkpointing_interval=2,
        gradient_checkpointing_segment_stride=3,
        gradient_checkpointing_offload_attention=False,
        model_family="longcat_video",
    )
    host = SimpleNamespace(config=config, model=model, unwrap_model=lambda model: model)
    ModelFoundation.apply_gradient_checkpointing_settings(host)
    assert model._checkpoint_interval == 2 and model._checkpoint_stride == 3
    assert [checkpointed for _, checkpointed in model.checkpoint_plan()] == [True]  # 2 blocks: one region


@pytest.fixture(scope="module")
def host_family():
    # Imported before the test's log capture starts: importing SimpleTuner reconfigures logging.
    from simpletuner_longcat_video.host.family import LongCatVideo

    return LongCatVideo


@pytest.mark.parametrize(
    ("keys", "level", "said"),
    [
        ({}, "attention", "longcat_checkpoint_saves attention (auto): each block keeps its input, self-attention"),
        (
            {"longcat_checkpoint_saves": "attention+ffn"},
            "attention+ffn",
            "longcat_checkpoint_saves attention+ffn (set in the config): each block keeps its input, self-attention "
            "output and log-sum-exp, and the FFN matmul outputs",
        ),
    ],
)
def test_the_family_hands_the_level_to_the_dit(host_family, keys, level, said, caplog):
    # The family's hook after the host loaded the DiT, on a family object holding only what it reads.
    from simpletuner_longcat_video.host.settings import read_settings

    family = object.__new__(host_family)
    family.config = _config(attention_implementation="sdpa", gradient_checkpointing=True, **keys)
    family.model = model = _model(None)
    family.__dict__["_settings"] = read_settings(family.config)
    family.unwrap_model = lambda model=None: model or family.model
    family.accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=True)
    with caplog.at_level("INFO", logger="simpletuner_longcat_video.host.family"):
        family.post_model_load_setup()
    assert model.checkpoint_saves == level
    assert f"LongCat-Video gradient checkpointing: {said}" in caplog.text


def _config(**keys):
    base = dict(attention_implementation="auto", longcat_compile_blocks="false", gradient_checkpointing_backend="torch")
    return SimpleNamespace(**{**base, **keys})


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, ("attention", "auto")),
        ({"longcat_checkpoint_saves": "auto"}, ("attention", "auto")),
        ({"longcat_checkpoint_saves": "attention+ffn"}, ("attention+ffn", "set in the config")),
        ({"longcat_checkpoint_saves": "NONE"}, ("none", "set in the config")),
        # Options that trade speed for memory keep auto off (an explicit level still works with them).
        (
            {"gradient_checkpointing_backend": "unsloth", "musubi_blocks_to_swap": 4},
            (
                "none",
                "auto, and none with musubi_blocks_to_swap and gradient_checkpointing_backend unsloth, which saves memory",
            ),
        ),
        ({"musubi_blocks_to_swap": 4, "longcat_checkpoint_saves": "attention"}, ("attention", "set in the config")),
        (
            {"base_model_precision": "int8-quanto"},
            ("none", "auto, and none with base_model_precision int8-quanto, which saves memory"),
        ),
        ({"base_model_precision": "no_change"}, ("attention", "auto")),
        (
            {"longcat_compile_blocks": "true", "gradient_checkpointing_backend": "unsloth"},
            ("none", "auto, and none with longcat_compile_blocks and gradient_checkpointing_backend unsloth"),
        ),
        (
            {"longcat_compile_blocks": "true", "musubi_blocks_to_swap": 2},
            ("none", "auto, and none with longcat_compile_blocks and musubi_blocks_to_swap"),
        ),
    ],
)
def test_the_option_and_what_auto_picks(keys, expected):
    from simpletuner_longcat_video.host.settings import read_settings

    settings = read_settings(_config(**keys))
    assert (settings.checkpoint_saves, settings.checkpoint_saves_reason) == expected


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"longcat_checkpoint_saves": "attn"}, r"longcat_checkpoint_saves = 'attn': must be one of \['auto', 'none'"),
        (
            {"longcat_checkpoint_saves": "attention", "longcat_compile_blocks": "true", "musubi_blocks_to_swap": 1},
            r"longcat_checkpoint_saves = 'attention with longcat_compile_blocks and musubi_blocks_to_swap': "
            r"block swap moves a block's weights in module hooks",
        ),
        (
            {
                "longcat_checkpoint_saves": "attention+proj",
                "longcat_compile_blocks": "true",
                "gradient_checkpointing_backend": "unsloth",
            },
            r"= 'attention\+proj with longcat_compile_blocks and gradient_checkpointing_backend unsloth': "
            r"a compiled block keeps its saves inside",
        ),
        (
            # The tiny checkpoint has 2 blocks (one may swap); "cuda:1" is not this CPU run's device.
            {"gradient_checkpointing_interval": 2, "musubi_blocks_to_swap": 1, "musubi_block_swap_device": "cuda:1"},
            r"gradient_checkpointing_interval = '2 with musubi_blocks_to_swap 1': block swap streams one block",
        ),
    ],
)
def test_unknown_values_and_combinations_are_refused_before_launch(keys, message, tiny_checkpoint):
    # What `simpletuner train` runs in its own process before accelerate starts (patches.py).
    from simpletuner_longcat_video.errors import LongCatVideoError
    from simpletuner_longcat_video.host.settings import check_config_before_launch

    config = _config(pretrained_model_name_or_path=str(tiny_checkpoint), model_flavour="final", **keys)
    with pytest.raises(LongCatVideoError, match=message):
        check_config_before_launch(config)


def test_auto_compile_stays_eager_where_a_level_meets_the_offload():
    # longcat_compile_blocks auto compiles on CUDA; with the host's offload and a level it must not,
    # since that combination is refused when asked for explicitly.
    from simpletuner_longcat_video.host.settings import compile_blocks_for, read_settings

    offload = _config(longcat_compile_blocks="auto", gradient_checkpointing_backend="unsloth")
    explicit = _config(**{**vars(offload), "longcat_checkpoint_saves": "attention"})
    assert compile_blocks_for(offload, read_settings(offload), "cuda")[0] is True  # auto saves: none
    compiled, reason = compile_blocks_for(explicit, read_settings(explicit), "cuda")
    assert not compiled and "longcat_checkpoint_saves attention" in reason


def test_xformers_is_refused_with_a_level_and_turns_auto_off(monkeypatch):
    from simpletuner_longcat_video.errors import LongCatVideoError
    from simpletuner_longcat_video.host import settings

    monkeypatch.setattr(settings, "xformers_available", lambda: True)
    auto = settings.read_settings(_config(attention_implementation="xformers"))
    assert (auto.checkpoint_saves, auto.checkpoint_saves_reason) == (
        "none",
        "auto, and none with attention_implementation xformers",
    )
    with pytest.raises(LongCatVideoError, match=r"'attention with attention_implementation xformers': the levels keep"):
        settings.read_settings(_config(attention_implementation="xformers", longcat_checkpoint_saves="attention"))


# ---------------------------------------------------------------------------------------------
# Worker side (block-sparse kernels): runs in a fresh interpreter with TRITON_INTERPRET=1.


def _worker_main() -> None:
    from simpletuner_longcat_video.core import attention, attention_bsa

    attention.load_entry_point_backends()
    # No CUDA here: the probe says unavailable; the interpreter runs the same kernels.
    attention.register_backend(dataclasses.replace(attention_bsa.BACKEND, is_available=lambda: True))
    launches = _Launches()
    depth = 1  # the interpreter and the compile are what cost here
    started = time.perf_counter()
    ref, ref_launches = _step(_model(None, "block_sparse", depth), launches)
    sdpa, _ = _step(_model(None, "sdpa", depth), launches)
    report: dict = {"plain_launches": ref_launches, "rel_bsa_vs_sdpa": _rel(ref["out"], sdpa["out"]), "runs": {}}
    wall = {"plain": round(time.perf_counter() - started, 1)}
    for level, compiled in (("none", False), ("attention", False), ("attention", True)):
        name = f"{level}{' compiled' if compiled else ''}"
        started = time.perf_counter()
        model = _model(level, "block_sparse", depth)
        if compiled:
            model.compile_blocks(backend="aot_eager")
            _step(model, launches)  # compiles
        got, counts = _step(model, launches)
        report["runs"][name] = {"launches": counts, "rel": {key: _rel(got[key], value) for key, value in ref.items()}}
        wall[name] = round(time.perf_counter() - started, 1)
    report["failed_backends"] = attention.failed_backends()
    report["depth"] = depth
    report["wall_s"] = wall
    print("SAC-BSA-RESULTS " + json.dumps(report))


@pytest.fixture(scope="module")
def bsa_report() -> dict:
    from test_kernels_block_sparse import kernel_worker_report

    result = kernel_worker_report(__file__, "SAC-BSA-RESULTS ")
    print("worker report:", json.dumps({**result, "runs": {k: v["launches"] for k, v in result["runs"].items()}}))
    return result


def test_block_sparse_attention_is_kept_not_relaunched(bsa_report):
    depth = bsa_report["depth"]
    assert bsa_report["failed_backends"] == {}
    # The kernels are in force (sparsity changes the output) and launch once per block per forward.
    assert bsa_report["rel_bsa_vs_sdpa"] > 1e-2
    assert bsa_report["plain_launches"] == {"forward": depth, "backward": 0}
    runs = bsa_report["runs"]
    # Plain checkpointing launches the forward kernel again for every block; a kept level never does,
    # eager or compiled.
    assert runs["none"]["launches"] == {"forward": depth, "backward": depth}
    for name in ("attention", "attention compiled"):
        assert runs[name]["launches"] == {"forward": depth, "backward": 0}, name
    for name, run in runs.items():
        for tensor, rel in run["rel"].items():
            assert rel <= 1e-5, f"{name} {tensor}: relative difference {rel:.2e}"


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
