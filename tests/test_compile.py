"""torch.compile (the presets' compile=true) on CPU: compiled loss and gradients equal eager ones.

Two paths, one tiny 1-layer model each (compiling costs ~20-30 s per model on 2 CPU cores):
  * bf16 autocast, dispatch="auto": AoE. Under a trace, `auto` picks torch._grouped_mm in bf16
    (dispatch.resolve_impl), and fullgraph=True proves the whole model, grouped experts included,
    is one graph: a graph break would raise.
  * fp32, dispatch="loop": router MoE. The reference loop slices each expert's rows with Python ints
    read from a tensor (DispatchPlan.bounds -> .tolist()): a data-dependent value, so Dynamo breaks
    the graph there (and recompiles per slice shape) but must still give eager's numbers.
The two kinds share dispatch.py, so between them both FFN kinds and both dispatch paths are traced.
"""

import pytest
import torch

from minimoe.model import GPT, GPTConfig

TINY = dict(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32, d_ffn=32, n_experts=4, top_k=2)


def loss_and_grads(model, params, idx, targets, bf16: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        _, loss = model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params}
    for _, p in params:
        p.grad = None
    return loss.detach().float(), grads


@pytest.mark.parametrize("ffn, dispatch, bf16, fullgraph, tol", [
    ("aoe", "auto", True, True, 2e-2),       # bf16: rounding differs where ops are fused
    ("moe", "loop", False, False, 1e-5),
])
def test_compiled_equals_eager(ffn, dispatch, bf16, fullgraph, tol):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, ffn=ffn, dispatch=dispatch))
    params = list(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 64, (2, 2, 16), generator=g)
    eager_loss, eager_grads = loss_and_grads(model, params, idx, targets, bf16)
    compiled = torch.compile(model, dynamic=False, fullgraph=fullgraph)
    loss, grads = loss_and_grads(compiled, params, idx, targets, bf16)
    assert abs(loss - eager_loss) <= tol * eager_loss
    assert grads.keys() == eager_grads.keys() and len(grads) == len(params)
    for name, grad in grads.items():
        ref = eager_grads[name]
        assert ref.norm() > 0, name
        # relative error of the whole tensor: gradients at init are tiny in absolute terms
        assert (grad - ref).norm() <= tol * ref.norm(), f"{name}: {(grad - ref).norm() / ref.norm():.2e}"
