"""parallelize.MasterWeightsOptimizer (bf16 weights + fp32 masters, the torch engine's non-FSDP layouts;
miss 2 of benchmarks/results/run_2xh200.md) against plain fp32 AdamW (make_optimizer) on the same numbers."""

import torch
from torch import nn

from planner.runner.parallelize import MasterWeightsOptimizer, make_optimizer, to_bf16_with_masters


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    model[2].weight = nn.Parameter(torch.randn(8, 16) * 0.1)
    return model


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def test_casts_in_place_and_keeps_exact_fp32_masters_and_tied_weights():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # tied: one parameter, one master
    init = model[0].weight.detach().clone()
    pairs = to_bf16_with_masters(model)
    assert len(pairs) == 1 and model[1].weight is model[0].weight is pairs[0][0]
    p, m = pairs[0]
    assert p.dtype == torch.bfloat16 and m.dtype == torch.float32 and torch.equal(m, init)
    assert torch.equal(p, init.to(torch.bfloat16))


def test_one_step_equals_fp32_adamw_on_the_bf16_gradients_then_rounds_to_bf16():
    """Any chunking (one parameter per chunk, or all in one) gives fp32 AdamW's exact update."""
    ref = _model()
    ref_opt = make_optimizer(ref.parameters(), lr=1e-2)
    runs = []
    for chunk_numel in (1, 10 ** 9):
        model = _model()
        pairs = to_bf16_with_masters(model)
        runs.append((model, pairs, MasterWeightsOptimizer(pairs, lr=1e-2, chunk_numel=chunk_numel)))
    for step in range(3):
        grads = _grads(ref, step)
        for p, g in zip(ref.parameters(), grads):
            p.grad = g.to(torch.bfloat16).float()  # the bf16 gradient a bf16 model receives, seen by fp32 AdamW
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for model, pairs, opt in runs:
            for (p, _), g in zip(pairs, grads):
                p.grad = g.to(torch.bfloat16)
            opt.step()
            opt.zero_grad(set_to_none=True)
            for r, (p, m) in zip(ref.parameters(), pairs):
                assert torch.equal(m, r.detach())  # masters: exactly fp32 AdamW
                assert torch.equal(p, r.detach().to(torch.bfloat16))  # weights: the master rounded to bf16
                assert p.grad is None and m.grad is None
    assert len(runs[0][2].chunks) == len(list(ref.parameters())) and len(runs[1][2].chunks) == 1


def test_parameters_without_gradients_are_left_alone():
    model = _model()
    pairs = to_bf16_with_masters(model)
    opt = MasterWeightsOptimizer(pairs, lr=1e-2)
    before = [(p.clone(), m.clone()) for p, m in pairs]
    pairs[0][0].grad = torch.ones_like(pairs[0][0])
    opt.step()
    assert not torch.equal(pairs[0][1], before[0][1])
    for (p, m), (p0, m0) in list(zip(pairs, before))[1:]:
        assert torch.equal(p, p0) and torch.equal(m, m0)
    state = {id(m): st for inner in opt.inners for m, st in inner.state.items()}
    assert state[id(pairs[0][1])]["step"] == 1 and id(pairs[1][1]) not in state
