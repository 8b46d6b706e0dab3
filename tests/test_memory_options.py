"""Memory options through the host's own mechanisms: block swap, quantised base weights, activation offload."""

from __future__ import annotations

import logging
import math
import re
from types import SimpleNamespace

import pytest
import torch
from _tiny_dit import TINY, i2v_batch, i2v_loss, lora_dit, take_lora_grads
from peft import LoraConfig

from simpletuner_longcat_video.core.transformer import (
    LORA_TARGET_MODULES,
    FP32Linear,
    LongCatVideoTransformer3DModel,
    check_blocks_to_swap,
)
from simpletuner_longcat_video.errors import LongCatVideoError
from simpletuner_longcat_video.host import family  # noqa: F401  (hands SimpleTuner's block swap and offloaded checkpoint to the DiT)
from simpletuner_longcat_video.host.settings import (
    check_block_swap_config,
    check_compile_config,
    compile_blocks_for,
    compile_blocks_requested,
    read_settings,
)

DEPTH = 4  # block swap streams the last blocks: enough blocks to keep some resident


def _model(seed: int = 0) -> LongCatVideoTransformer3DModel:
    return lora_dit(seed, depth=DEPTH)


def _step(model: LongCatVideoTransformer3DModel, inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out, loss = i2v_loss(model, inputs)
    loss.backward()
    return out.detach(), take_lora_grads(model)


class _RecordingSwap:
    """Wraps the host's manager so the test sees which block it streams, and when."""

    def __init__(self, manager, blocks) -> None:
        self.events: list[tuple[str, int]] = []
        index = {id(block): i for i, block in enumerate(blocks)}
        stream_in, stream_out = manager.stream_in, manager.stream_out

        def recording_in(block, device, checkpointed=None):
            self.events.append(("in", index[id(block)]))
            return stream_in(block, device, checkpointed)

        def recording_out(block):
            self.events.append(("out", index[id(block)]))
            return stream_out(block)

        manager.stream_in, manager.stream_out = recording_in, recording_out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_block_swap_streams_the_last_blocks_and_changes_nothing(checkpointing):
    inputs = i2v_batch()
    plain = _model()
    swapped = _model()
    if checkpointing:
        plain.enable_gradient_checkpointing()
        swapped.enable_gradient_checkpointing()
    # A machine without a GPU has one device; "cpu:0" is a different torch.device from the
    # compute device "cpu", so the host's manager installs its hooks and runs its real protocol
    # (its moves are no-ops here; the GPU run in benchmarks/train_step.py moves for real).
    swapped.enable_block_swap(2, "cpu:0")
    assert swapped.swapped_blocks == [2, 3]
    recorder = _RecordingSwap(swapped._musubi_block_swap, list(swapped.blocks))

    out_plain, grads_plain = _step(plain, inputs)
    out_swapped, grads_swapped = _step(swapped, inputs)

    assert torch.equal(out_plain, out_swapped)
    assert grads_plain.keys() == grads_swapped.keys() and len(grads_plain) > 0
    # The host's full-backward hooks re-associate a few gradient sums (float32 rounding, ~1e-7
    # relative); a block run with stale or missing weights would be off by orders of magnitude.
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_swapped[name], grad, rtol=1e-5, atol=1e-9, msg=name)
    assert {index for _, index in recorder.events} == {2, 3}, recorder.events
    # The forward loop and the host's module hooks both ask for the same move; collapse repeats.
    events = [e for i, e in enumerate(recorder.events) if i == 0 or e != recorder.events[i - 1]]
    assert events[:4] == [("in", 2), ("out", 2), ("in", 3), ("out", 3)], events
    # Backward runs the blocks in reverse and brings each swapped one back before its gradients.
    backward = events[4:]
    assert ("in", 3) in backward and ("in", 2) in backward, events
    assert backward.index(("in", 3)) < backward.index(("in", 2)), events


def test_block_swap_off_and_on_again():
    model = _model()
    model.enable_block_swap(3, "cpu:0")
    assert model.swapped_blocks == [1, 2, 3]
    model.enable_block_swap(0)
    assert model.swapped_blocks == [] and model._musubi_block_swap is None


@pytest.mark.parametrize("bad", [-1, 4, 48, True, 2.5, "2"])
def test_block_swap_count_out_of_range_is_refused(bad):
    with pytest.raises(LongCatVideoError) as err:
        check_blocks_to_swap(bad, 4)
    message = str(err.value)
    assert message.startswith(f"musubi_blocks_to_swap = {bad!r}")
    assert "1 to 3 of the DiT's 4 blocks" in message and "Fix: use a whole number from 1 to 3" in message


def test_block_swap_config_checked_against_the_checkpoint_depth(tiny_checkpoint):
    # The tiny checkpoint has 2 blocks: 1 may swap, 2 may not; the hub id means the real 48.
    ok = SimpleNamespace(
        musubi_blocks_to_swap=1, musubi_block_swap_device="cpu", pretrained_model_name_or_path=str(tiny_checkpoint)
    )
    check_block_swap_config(ok, "cuda:0")
    with pytest.raises(LongCatVideoError, match=r"1 to 1 of the DiT's 2 blocks"):
        check_block_swap_config(SimpleNamespace(**{**vars(ok), "musubi_blocks_to_swap": 2}), "cuda:0")
    hub = SimpleNamespace(musubi_blocks_to_swap=48, pretrained_model_name_or_path="meituan-longcat/LongCat-Video")
    with pytest.raises(LongCatVideoError, match=r"musubi_blocks_to_swap = 48: .*1 to 47 of the DiT's 48 blocks"):
        check_block_swap_config(hub, "cuda:0")
    check_block_swap_config(SimpleNamespace(**{**vars(hub), "musubi_blocks_to_swap": 0}), "cuda:0")  # off


def test_block_swap_device_must_differ_from_the_training_device(tiny_checkpoint):
    base = dict(musubi_blocks_to_swap=1, pretrained_model_name_or_path=str(tiny_checkpoint))
    with pytest.raises(LongCatVideoError, match=r"musubi_block_swap_device = 'cuda'.*is the training device"):
        check_block_swap_config(SimpleNamespace(**base, musubi_block_swap_device="cuda"), "cuda:0")
    with pytest.raises(LongCatVideoError, match=r"musubi_block_swap_device = 'gpu please'.*must name a torch device"):
        check_block_swap_config(SimpleNamespace(**base, musubi_block_swap_device="gpu please"), "cuda:0")
    check_block_swap_config(SimpleNamespace(**base, musubi_block_swap_device="cuda:1"), "cuda:0")
    # Training on a CPU: "use cpu" would be no fix; the message says to turn block swap off.
    with pytest.raises(LongCatVideoError, match=r"training device \(cpu\).*Fix: set musubi_blocks_to_swap to 0: block"):
        check_block_swap_config(SimpleNamespace(**base, musubi_block_swap_device="cpu"), "cpu")


def _host_quantise(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The host's own quantiser, called the way its trainer calls it for the base model."""
    from simpletuner.helpers.training.quantisation import quantise_model
    from simpletuner.helpers.training.state_tracker import StateTracker

    args = SimpleNamespace(
        model_family="longcat_video",
        base_model_precision=precision,
        quantize_activations=False,
        text_encoder_1_precision="no_change",
        text_encoder_2_precision="no_change",
        text_encoder_3_precision="no_change",
        text_encoder_4_precision="no_change",
    )
    StateTracker.set_args(args)
    return quantise_model(model=model, args=args, return_dict=True)["model"] or model


def test_int8_quanto_base_with_lora_trains_and_keeps_fp32_layers():
    from optimum.quanto import QLinear, QTensor

    torch.manual_seed(0)
    model = LongCatVideoTransformer3DModel(**{**TINY, "depth": DEPTH})
    model.requires_grad_(False)
    model = _host_quantise(model, "int8-quanto")

    quantised = [name for name, module in model.named_modules() if isinstance(module, QLinear)]
    assert "blocks.0.attn.qkv" in quantised and "blocks.3.ffn.w2" in quantised
    # The float32 layers (timestep MLP, adaLN, output projection) stay unquantised by design.
    fp32_layers = [name for name, module in model.named_modules() if isinstance(module, FP32Linear)]
    assert "blocks.0.adaLN_modulation.1" in fp32_layers and "final_layer.linear" in fp32_layers
    assert all(not isinstance(module.weight, QTensor) for module in model.modules() if isinstance(module, FP32Linear))
    assert isinstance(model.blocks[0].attn.qkv.weight, QTensor)

    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES)))
    lora = [p for name, p in model.named_parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all("lora_" in name for name, p in model.named_parameters() if p.requires_grad)

    batch = i2v_batch()
    optimizer = torch.optim.AdamW(lora, lr=3e-3)
    losses = []
    for _ in range(8):
        _, loss = i2v_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0] * 0.98, losses
    assert sum(b < a for a, b in zip(losses, losses[1:], strict=False)) >= 6, losses
    # The int8 base never moved: only LoRA trained.
    assert isinstance(model.blocks[0].attn.qkv.weight, QTensor)


def test_unsloth_checkpointing_backend_gives_the_same_gradients():
    inputs = i2v_batch()
    reference = _model()
    reference.enable_gradient_checkpointing()
    offloaded = _model()
    offloaded.enable_gradient_checkpointing()
    offloaded.set_gradient_checkpointing_backend("unsloth")
    out_ref, grads_ref = _step(reference, inputs)
    out_off, grads_off = _step(offloaded, inputs)
    assert torch.equal(out_ref, out_off)
    for name, grad in grads_ref.items():
        assert torch.allclose(grad, grads_off[name], rtol=0, atol=1e-7), name
    with pytest.raises(LongCatVideoError, match="gradient_checkpointing_backend = 'torch-ffn'"):
        offloaded.set_gradient_checkpointing_backend("torch-ffn")


def test_compiled_blocks_give_the_same_step(caplog):
    inputs = i2v_batch()
    eager, compiled = _model(), _model()
    for model in (eager, compiled):
        model.enable_gradient_checkpointing()
    compiled.compile_blocks()
    out_eager, grads_eager = _step(eager, inputs)
    with caplog.at_level(logging.INFO, logger="simpletuner_longcat_video.core.transformer"):
        out_compiled, grads_compiled = _step(compiled, inputs)
        _step(compiled, inputs)
    # The compile time reaches the log once per grad mode, with a figure; eager models say nothing.
    timings = [r.getMessage() for r in caplog.records if "compiled blocks: the first" in r.getMessage()]
    assert len(timings) == 1 and re.search(r"first training forward took \d+\.\d s", timings[0]), timings
    # Inductor fuses float32 element-wise chains, so sums may round differently (~1e-6).
    torch.testing.assert_close(out_compiled, out_eager, rtol=1e-4, atol=1e-5)
    for name, grad in grads_eager.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(None, None), ("auto", None), ("false", False), ("true", True), ("TRUE", True), (True, True), (False, False)],
)
def test_compile_option_values(raw, expected):
    assert compile_blocks_requested(SimpleNamespace(longcat_compile_blocks=raw)) is expected


def test_compile_option_refuses_other_values():
    with pytest.raises(LongCatVideoError, match=r"longcat_compile_blocks = 'yes': must be auto, true or false"):
        compile_blocks_requested(SimpleNamespace(longcat_compile_blocks="yes"))


@pytest.mark.parametrize(
    ("keys", "device", "expected"),
    [
        ({}, "cuda", True),
        ({}, "cpu", False),
        ({"base_model_precision": "int8-quanto"}, "cuda", False),
        ({"base_model_precision": "fp8-torchao"}, "cuda", False),
        ({"musubi_blocks_to_swap": 8}, "cuda", False),
        ({"context_parallel_size": 2}, "cuda", False),
        ({"longcat_compile_blocks": "false"}, "cuda", False),
        ({"longcat_compile_blocks": "true"}, "cpu", True),
        ({"longcat_compile_blocks": "true", "musubi_blocks_to_swap": 8}, "cuda", True),
    ],
)
def test_auto_compiles_only_in_the_measured_setting(keys, device, expected):
    # auto = compiled where the H200 measured it faster (bf16 base, CUDA, no swap, no context
    # parallelism); an explicit value always wins.
    config = SimpleNamespace(**keys)
    compiled, reason = compile_blocks_for(config, read_settings(config), device)
    assert compiled is expected and reason


def test_compiled_blocks_with_a_quanto_base_are_refused():
    def check(compile_blocks: str, precision: str) -> None:
        config = SimpleNamespace(longcat_compile_blocks=compile_blocks, base_model_precision=precision)
        check_compile_config(config, read_settings(config))

    check("true", "no_change")
    check("false", "int8-quanto")
    with pytest.raises(LongCatVideoError, match=r"longcat_compile_blocks = .*int8-quanto.*cannot trace optimum-quanto"):
        check("true", "int8-quanto")


def test_block_swap_brings_the_lora_of_swapped_blocks_to_the_compute_device():
    # The H200 host run: the LoRA was created in CPU memory and the swapped blocks' LoRA weights
    # stayed there ("mat2 is on cpu ... cuda:0"). Here "meta" stands in for the GPU, which a
    # CPU tensor cannot be moved onto in place: the test checks what the forward would move.
    model = _model()
    model.enable_block_swap(2, "cpu")
    lora = {id(p) for i in (2, 3) for n, p in model.blocks[i].named_parameters() if "lora_" in n}
    moved = model._swapped_trainables_elsewhere(torch.device("meta"))
    assert {id(p) for p in moved} == lora and len(lora) == 2 * 2 * len(LORA_TARGET_MODULES)
    assert model._swapped_trainables_elsewhere(torch.device("cpu")) == []  # already there: no move
