"""Compiled blocks stay one graph each inside the host's mixed-precision autocast region.

SimpleTuner runs the model under accelerate's bf16 autocast. The DiT's float32 layers leave that
region for their own math; done through a helper object Dynamo cannot trace, every such layer
split the compiled block (14 graph breaks per block on the H200, 2026-12-02: 8.4 s/step through
the host against 6.63 s in ``benchmarks/train_step.py``, which runs without autocast).
"""

from __future__ import annotations

import torch
from _tiny_dit import TINY, i2v_batch, i2v_loss, lora_dit, take_lora_grads
from torch._dynamo.utils import counters


def _step_under_autocast(model: torch.nn.Module) -> tuple[torch.Tensor, dict]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, loss = i2v_loss(model, i2v_batch())
    loss.backward()
    return out.detach().float(), take_lora_grads(model)


def test_compiled_blocks_have_no_graph_break_under_bf16_autocast_and_match_eager():
    eager_out, eager_grads = _step_under_autocast(lora_dit())

    model = lora_dit()
    graphs: list = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    model.compile_blocks(backend=record)
    out, grads = _step_under_autocast(model)

    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    assert len(graphs) == TINY["depth"]
    # The float32 layers really left the bf16 region in both runs: same numbers, eager and compiled.
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], rtol=1e-5, atol=1e-6)
