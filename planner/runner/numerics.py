"""The numerics check: the parallel run's losses against a single-process run of the same training.

House rule 10: every parallel run is tested against a single-process run. The reference builds the
whole model with the same per-name weights (parallelize.init_weights_by_name), reads the same global
batches (runner.data), accumulates gradients over the same micro-batches (mean loss), and steps the
same AdamW (parallelize.make_optimizer). Its loss at step k is then the parallel run's loss at step k
up to floating-point reassociation (sharded matmuls, reduction order, bf16 rounding).

Tolerances per compute dtype (|parallel - reference| <= atol + rtol * |reference|, each step):
- fp32: rtol 1e-5, atol 1e-6. Reassociated fp32 sums differ by ~1e-7 relative per op, and over the
  first steps of AdamW the losses of the CI plans (dp, tp+sp, pp 1F1B/interleaved, FSDP2) stay within
  ~2e-7 of the reference: 1e-5 leaves a 50x margin. It is that tight on purpose: a real bug is small
  too at lr 1e-4 (skipping the tied-embedding gradient sum between the first and last pipeline stage
  moves the loss by 1.6e-5 at step 2 and 2.2e-5 at step 3), and rtol 1e-4 would let it pass.
- bf16: rtol 2e-2, atol 1e-2. bf16 keeps 8 mantissa bits (relative rounding 2^-8 = 3.9e-3); matmuls
  accumulate in fp32 but their inputs and outputs are rounded, and sharded runs round in different
  places, so losses differ by a few 1e-3 relative; 2e-2 is ~5 roundings.
The first NUMERICS_STEPS steps (warm-up included) are compared; step 0 checks the forward pass,
later steps check gradients and the optimizer.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

from planner.core.plan import Plan
from planner.runner.report import NumericsResult

TOLERANCES = {"fp32": (1e-5, 1e-6), "bf16": (2e-2, 1e-2)}  # dtype -> (rtol, atol)
NUMERICS_STEPS = 10  # steps compared with the single-process reference (warm-up included)


def reference_losses(plan: Plan, steps: int, seed: int, lr: float, dtype: str, device: str,
                     data_path: str | None = None, data_dtype: str = "uint16") -> list[float]:
    """Losses of `steps` optimizer steps of the plan's training on one process (no parallelism).

    On the CPU it runs one intra-op thread: CPU runs are for tiny CI models, where OpenMP threads only
    add contention (50x slower on a loaded 2-core machine).
    """
    import torch

    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        torch.set_num_threads(1)
    try:
        return _reference_losses(plan, steps, seed, lr, dtype, device, data_path, data_dtype)
    finally:
        torch.set_num_threads(threads)


def _reference_losses(plan: Plan, steps: int, seed: int, lr: float, dtype: str, device: str,
                      data_path: str | None, data_dtype: str) -> list[float]:
    import torch

    from planner.build.modeling import lm_loss
    from planner.runner.data import DataSource
    from planner.build.parallelize import build_full, make_optimizer, materialise

    cfg, spec = plan.parallel, plan.model
    dev = torch.device(device)
    model = build_full(spec)
    materialise(model, dev, spec, seed)
    optimizer = make_optimizer(model.parameters(), lr)
    data = DataSource(spec, cfg.seq_len, cfg.global_batch_size, seed=seed, path=data_path, dtype=data_dtype)
    chunks = cfg.global_batch_size // cfg.micro_batch_size
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    out = []
    for step in range(steps):
        inputs, targets = (t.to(dev) for t in data.global_batch(step))
        total = 0.0
        for j in range(chunks):
            rows = slice(j * cfg.micro_batch_size, (j + 1) * cfg.micro_batch_size)
            with autocast:
                loss = lm_loss(model(inputs[rows]), targets[rows]) / chunks
            loss.backward()
            total += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(total)
    return out


def compare(parallel: list[float] | tuple[float, ...], reference: list[float], dtype: str) -> NumericsResult:
    """Each step's loss must satisfy |parallel - reference| <= atol + rtol * |reference|."""
    rtol, atol = TOLERANCES[dtype]
    k = min(len(parallel), len(reference))
    if k == 0:
        return NumericsResult(checked=False, dtype=dtype, rtol=rtol, atol=atol, passed=None,
                              note="the parallel run reported no loss")
    par, ref = list(parallel[:k]), list(reference[:k])
    abs_err = [abs(p - r) if not math.isnan(p) else math.inf for p, r in zip(par, ref)]
    rel_err = [e / abs(r) if r else e for e, r in zip(abs_err, ref)]
    ok = all(e <= atol + rtol * abs(r) for e, r in zip(abs_err, ref))
    worst = max(range(k), key=lambda i: abs_err[i])
    note = "" if ok else (f"step {worst}: parallel loss {par[worst]:.6g} vs single-process {ref[worst]:.6g} "
                          f"(|diff| {abs_err[worst]:.3g} > {atol:g} + {rtol:g} * |ref|)")
    return NumericsResult(checked=True, dtype=dtype, rtol=rtol, atol=atol, reference_losses=tuple(ref),
                          parallel_losses=tuple(par), max_abs_error=max(abs_err), max_rel_error=max(rel_err),
                          passed=ok, note=note)


def check_numerics(plan: Plan, parallel_losses: tuple[float, ...], seed: int, lr: float, dtype: str, device: str,
                   data_path: str | None = None, data_dtype: str = "uint16") -> NumericsResult:
    """Run the reference for the first steps of the parallel run and compare; never raises on OOM."""
    steps = min(len(parallel_losses), NUMERICS_STEPS)
    rtol, atol = TOLERANCES[dtype]
    ref, oom = None, ""
    try:
        ref = reference_losses(plan, steps, seed, lr, dtype, device, data_path, data_dtype)
    except (RuntimeError, MemoryError) as exc:  # e.g. the whole model does not fit on one device
        if "out of memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        oom = type(exc).__name__
    release_device_memory(device)  # after the except block: the exception's frames hold the model too
    if ref is None:
        return NumericsResult(checked=False, dtype=dtype, rtol=rtol, atol=atol, passed=None,
                              note=f"the single-process reference does not fit on {device} ({oom})")
    return compare(parallel_losses[:steps], ref, dtype)


def release_device_memory(device: str) -> None:
    """Give the reference's GPU memory back to the driver. The reference runs in the launching process, whose
    caching allocator otherwise keeps it: on 2xH200 the next run of a campaign found 86 GiB of GPU 0 held by
    the launcher after gpt2-xl's reference and ran out of memory (benchmarks/results/run_2xh200.md)."""
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
