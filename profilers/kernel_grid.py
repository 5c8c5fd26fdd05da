"""The three grids of the kernel database, their sizes (plan_settings: tiny on a CPU, the GPU's for the issue's
shapes) and their measurement point by point (profilers/hardware.py runs them within a budget;
planner/core/kerneldb.py reads what they produce).

- GEMMs: for every (m, n, k) = (tokens, out features, in features) of an nn.Linear, its three training GEMMs as
  torch runs them: fwd `x @ W.T`, dgrad `dy @ W`, wgrad `dy.T @ x` (torch.mm on views of four preallocated random
  buffers, the output into a fourth, so no call allocates and inputs never degrade into inf or zeros, which run
  at other speeds). A second, coarser grid holds odd n (gemm_unaligned: a row of the output or of dy that is not
  16-byte aligned, as in GPT-2's 50,257-word head), which cuBLAS runs on slower kernels.
- Attention: torch's scaled_dot_product_attention, causal, q [1, heads, seq, head_dim] against K/V of heads / gqa
  heads (enable_gqa where this torch has it; else K/V expanded beforehand, as planner/build/modeling.py does, whose copy
  is the gqa_expand kernel), forward, and backward on a retained graph; the backend torch picks is recorded.
- Memory-bound kernels as planner/build/modeling.py runs them (its RMSNorm, rotary and float32 cross-entropy are several
  kernels each): forward, and backward on a retained graph, timed eagerly (kernel_timing.NO_CAPTURE says why);
  kerneldb.WORK says the bytes each moves.

Points run in order of work (FLOPs or bytes), smallest first: a budget that runs out leaves only the largest
shapes unmeasured, where the rate has plateaued and the loader holds it. A point that fails (out of memory, an
error) is recorded as failed with its error; the grid goes on.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import nn

from planner.core.kerneldb import ATTENTION_AXES, GEMM_AXES, GEMM_LAYOUTS, MB_AXES, WORK
from planner.build.modeling import LAYER_NORM_EPS, RMSNorm, apply_rotary, lm_loss
from profilers.kernel_timing import KernelTimer
from profilers.timing import free_memory, is_oom

MIN_KERNEL_S = 4e-6  # shortest kernel on a Hopper GPU, launch to finish (an empty kernel's ~2-3 us plus its work)
ATTENTION_RATE = 0.4  # fraction of the probed matmul rate assumed for attention when sizing loops (FA2 on H100: ~0.45)
DROPOUT_P = 0.1  # Megatron-LM's default hidden and attention dropout
ERRORS_KEPT = 5  # distinct error messages recorded per section
GIB = 2**30
# the GPU plan (plan_settings); its time on an H100 is tests/profilers/test_hardware.py's arithmetic
LOOP_S = 1e-3  # GPU time of one timed loop: a graph replay's own start (a few us) stays under 1% of it
REPEATS = 5  # timed loops per point, median kept
GEMM_FLOP_CAP = 2.0**42  # ~5.6 ms at 780 TFLOP/s; square GEMMs plateau from 4096^3 = 2^37 (profile_1xh100.md: 779-787)
GEMM_OPERAND_CAP = 2 * GIB  # largest operand or output (2^30 bf16 elements: the logits of 4096 tokens x 256k vocab)
ATTENTION_FLOP_CAP = 2.0**43  # forward, ~27 ms at 330 TFLOP/s: seq 128k runs with 2 heads of 128 (4 of 64)
MB_BYTES_CAP = 4 * GIB  # ~1.3 ms at 3 TB/s, past where bandwidth plateaus (a 1 GiB copy already reaches 3.0 TB/s)
UNALIGNED_FLOP_CAP = 2.0**40  # unaligned GEMMs run several times slower (GPT-2's head: ~7x): a lower cap, same ms
UNALIGNED_N = tuple(2**j + 1 for j in (6, 8, 10, 12, 13, 14, 15, 16, 17, 18))  # odd out-features: 65 to 256k vocab
HIDDEN_WIDTHS = (1024, 4096, 16384)  # the hidden sizes, ends and middle (ffn shards fall inside)
VOCAB_WIDTHS = (32768, 65536, 131072, 262144)  # the vocabularies 32k-256k
ROWS = (16, 131072)  # tokens per micro-batch (x heads for rotary), from latency-bound to 128k
SUSTAIN_S = 15.0  # sustained-clock loop: H100/H200 reach their power limit within seconds (campaign_4xh200.md)
ADAMW_PARAMS = 2**28  # AdamW step size timed on a GPU (facts.measure_ceilings' size: memory-bound, rate holds)


@dataclass(frozen=True)
class GemmGrid:
    m: tuple[int, ...]
    n: tuple[int, ...]
    k: tuple[int, ...]
    flop_cap: float  # larger GEMMs are not run: compute-bound, the loader holds the rate
    operand_cap_bytes: int  # nor those with an operand or output larger than this


@dataclass(frozen=True)
class AttentionGrid:
    seq: tuple[int, ...]
    heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    gqa: tuple[int, ...]
    flop_cap: float  # forward FLOPs (kerneldb.WORK['attention.fwd']) past which a point is not run
    memory_cap_bytes: int


@dataclass(frozen=True)
class MemoryGrid:
    widths: dict  # op -> widths (hidden, ffn, head_dim or vocabulary)
    rows: tuple[int, ...]
    bytes_cap: int  # points whose forward or backward moves more bytes than this are not run
    fixed: dict  # op -> parameters that are not axes (heads of rotary, groups of gqa_expand, hidden of embedding)


def octaves(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(2**j for j in range(lo.bit_length() - 1, hi.bit_length()) if lo <= 2**j <= hi)


def half_octaves(lo: int, hi: int) -> tuple[int, ...]:
    return tuple(sorted(v for x in octaves(lo, hi) for v in (x, 3 * x // 2) if lo <= v <= hi))


@dataclass(frozen=True)
class Settings:
    loop_s: float  # device time of one timed loop (kernel_timing)
    repeats: int  # timed loops per point; the median is kept
    gemm: tuple[GemmGrid, ...]  # candidates, finest first
    gemm_unaligned: GemmGrid  # n odd (not a multiple of 8: cuBLAS's other kernels), e.g. GPT-2's 50,257 vocabulary
    attention: AttentionGrid
    memory: MemoryGrid
    max_inner: dict  # section -> most calls in one timed loop (captures of many autograd calls cost host time)
    adamw_params: int
    sustain_s: float
    probe_n: int  # square matmul of the probe
    probe_copy_bytes: int


def plan_settings(cuda: bool, quick: bool, memory_bytes: int) -> Settings:
    if not cuda:  # CI: seconds on one core
        hidden = {"layer_norm": (32, 64), "rms_norm": (32, 64), "swiglu": (32, 64), "gelu": (32, 64), "add": (32, 64),
                  "dropout": (32, 64), "rotary": (16, 32), "cross_entropy": (64, 128), "embedding": (64, 128),
                  "gqa_expand": (16,)}
        return Settings(loop_s=2e-4, repeats=3,
                        gemm=(GemmGrid(m=(32, 64), n=(32, 64), k=(32, 64), flop_cap=2.0**20, operand_cap_bytes=2**20),),
                        gemm_unaligned=GemmGrid(m=(32, 64), n=(33, 65), k=(32, 64), flop_cap=2.0**20,
                                                operand_cap_bytes=2**20),
                        attention=AttentionGrid(seq=(32, 64), heads=(1, 2), head_dim=(16, 32), gqa=(1, 2),
                                                flop_cap=2.0**20, memory_cap_bytes=2**24),
                        memory=MemoryGrid(widths=hidden, rows=(8, 16), bytes_cap=2**22,
                                          fixed={"rotary": {"heads": 8}, "gqa_expand": {"groups": 4, "kv_heads": 8},
                                                 "embedding": {"hidden": 32}}),
                        max_inner={"gemm": 8, "attention": 2, "memory_bound": 4}, adamw_params=2**14, sustain_s=0.0,
                        probe_n=128, probe_copy_bytes=2**22)
    operand_cap = min(GEMM_OPERAND_CAP, memory_bytes // 40)  # 4 GEMM buffers: a tenth of the GPU at most
    m = octaves(256, 131072)  # tokens per micro-batch: the 512-65536 and one octave either side
    fine = GemmGrid(m=m, n=half_octaves(64, 262144), k=half_octaves(128, 65536), flop_cap=GEMM_FLOP_CAP,
                    operand_cap_bytes=operand_cap)  # n: a GQA shard's K/V (64) to 256k vocab; k: hidden/8 to ffn
    coarse = GemmGrid(m=m, n=octaves(64, 262144), k=octaves(128, 65536), flop_cap=GEMM_FLOP_CAP,
                      operand_cap_bytes=operand_cap)
    widths = {"layer_norm": HIDDEN_WIDTHS, "rms_norm": HIDDEN_WIDTHS, "swiglu": HIDDEN_WIDTHS, "gelu": HIDDEN_WIDTHS,
              "add": HIDDEN_WIDTHS, "dropout": HIDDEN_WIDTHS, "rotary": (64, 128), "cross_entropy": VOCAB_WIDTHS,
              "embedding": VOCAB_WIDTHS, "gqa_expand": (128,)}
    seqs, heads, rows = octaves(1024, 131072), octaves(1, 128), octaves(*ROWS)
    return Settings(
        loop_s=LOOP_S, repeats=REPEATS, gemm=(coarse,) if quick else (fine, coarse),
        gemm_unaligned=GemmGrid(m=m[::2] if quick else m, n=UNALIGNED_N[::2] if quick else UNALIGNED_N,
                                k=octaves(512, 16384), flop_cap=UNALIGNED_FLOP_CAP, operand_cap_bytes=operand_cap),
        attention=AttentionGrid(seq=seqs[::2] if quick else seqs, heads=heads[::2] if quick else heads,
                                head_dim=(64, 128), gqa=(1, 8) if quick else (1, 4, 8), flop_cap=ATTENTION_FLOP_CAP,
                                memory_cap_bytes=min(8 * GIB, memory_bytes // 8)),
        memory=MemoryGrid(widths=widths, rows=rows[::2] if quick else rows, bytes_cap=MB_BYTES_CAP,
                          fixed={"rotary": {"heads": 8}, "gqa_expand": {"groups": 4, "kv_heads": 8},
                                 "embedding": {"hidden": 4096}}),
        max_inner={"gemm": 256, "attention": 16, "memory_bound": 32}, adamw_params=ADAMW_PARAMS, sustain_s=SUSTAIN_S,
        probe_n=8192, probe_copy_bytes=GIB)


@dataclass
class Section:
    """What a grid measured: seconds per key (layout, phase or kernel) per point, and the raw records."""
    seconds: dict
    points: list
    errors: dict
    counts: dict

    def mark(self, key: str, point: tuple, value) -> None:
        self.seconds.setdefault(key, {})[point] = value
        label = value if isinstance(value, str) else "measured"
        self.counts[label] = self.counts.get(label, 0) + 1

    def fail(self, exc: BaseException, device: torch.device) -> None:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if why in self.errors or len(self.errors) < ERRORS_KEPT:
            self.errors[why] = self.errors.get(why, 0) + 1
        if is_oom(exc):
            free_memory(device)


def new_section() -> Section:
    return Section(seconds={}, points=[], errors={}, counts={})


def nest(section: Section, key: str, axes: tuple[tuple, ...]) -> list:
    """Row-major nested lists over `axes` of the key's seconds (4 significant digits) or missing codes."""
    got = section.seconds.get(key, {})

    def build(prefix: tuple, depth: int):
        if depth == len(axes):
            v = got.get(prefix, "budget")
            return v if isinstance(v, str) else float(f"{v:.4g}")
        return [build((*prefix, x), depth + 1) for x in axes[depth]]

    return build((), 0)


def _record(section: Section, key: str, point: tuple, names: tuple, result: dict, **extra) -> None:
    section.mark(key, point, result["seconds"])
    section.points.append({"key": key, **dict(zip(names, point)), **{k: (float(f"{v:.5g}") if isinstance(v, float)
                                                                          else v) for k, v in result.items()}, **extra})


Tick = Callable[[str], None]


# ---- GEMMs ---------------------------------------------------------------------------------------------------


def gemm_status(grid: GemmGrid, m: int, n: int, k: int, elem: int) -> str | None:
    if 2 * m * n * k > grid.flop_cap:
        return "flop_cap"
    return "memory_cap" if max(m * k, n * k, m * n) * elem > grid.operand_cap_bytes else None


def gemm_estimate_s(grid: GemmGrid, elem: int, flops: float, bw: float, timer_loop_s: float, repeats: int,
                    max_inner: int, host_point_s: float, host_call_s: float) -> float:
    """Seconds the grid should take: per point and layout the host's capture (host_point_s + inner calls x
    host_call_s) and the GPU's warm-up and timed replays of `inner` calls of the roofline time."""
    total = 0.0
    for m, n, k in itertools.product(grid.m, grid.n, grid.k):
        if gemm_status(grid, m, n, k, elem) is None:
            t = max(2 * m * n * k / flops, elem * (m * k + n * k + m * n) / bw, MIN_KERNEL_S)
            inner = max(1, min(max_inner, math.ceil(timer_loop_s / t)))
            total += 3 * (host_point_s + inner * host_call_s + (repeats + 2) * inner * t)
    return total


def measure_gemm(grid: GemmGrid, device: torch.device, dtype: torch.dtype, timer: KernelTimer, flops: float,
                 bw: float, max_inner: int, deadline: float, tick: Tick) -> Section:
    sec, elem = new_section(), torch.empty((), dtype=dtype).element_size()
    points = sorted(itertools.product(grid.m, grid.n, grid.k), key=lambda p: (math.prod(p), p))
    run = [p for p in points if gemm_status(grid, *p, elem) is None]
    need = {"x": max((m * k for m, n, k in run), default=1), "w": max((n * k for m, n, k in run), default=1),
            "dy": max((m * n for m, n, k in run), default=1)}
    need["out"] = max(need.values())
    buf = {name: torch.randn(size, device=device, dtype=dtype) for name, size in need.items()}
    try:
        for i, (m, n, k) in enumerate(points):
            status = gemm_status(grid, m, n, k, elem) or ("budget" if time.monotonic() > deadline else None)
            if status:
                for layout in GEMM_LAYOUTS:
                    sec.mark(layout, (m, n, k), status)
                continue
            x, w, dy = buf["x"][:m * k].view(m, k), buf["w"][:n * k].view(n, k), buf["dy"][:m * n].view(m, n)
            calls = {"fwd": lambda: torch.mm(x, w.t(), out=buf["out"][:m * n].view(m, n)),
                     "dgrad": lambda: torch.mm(dy, w, out=buf["out"][:m * k].view(m, k)),
                     "wgrad": lambda: torch.mm(dy.t(), x, out=buf["out"][:n * k].view(n, k))}
            est = max(2 * m * n * k / flops, elem * (m * k + n * k + m * n) / bw, MIN_KERNEL_S)
            for layout in GEMM_LAYOUTS:
                try:
                    _record(sec, layout, (m, n, k), GEMM_AXES, timer.measure(calls[layout], est, max_inner,
                                                                             kind=f"gemm.{layout}"))
                except Exception as exc:  # noqa: BLE001 - one point's failure is recorded, the grid goes on
                    sec.fail(exc, device)
                    sec.mark(layout, (m, n, k), "failed")
            tick(f"gemm {i + 1}/{len(points)} points")
    finally:
        del buf
        free_memory(device)
    return sec


# ---- attention -------------------------------------------------------------------------------------------------


def sdpa_has_gqa() -> bool:
    q = torch.zeros(1, 2, 4, 8)
    try:
        Fn.scaled_dot_product_attention(q, q[:, :1], q[:, :1], is_causal=True, enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


def _backend(q, k, v, gqa_kw: dict) -> str:
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, **gqa_kw)).name.lower()
    except Exception:  # noqa: BLE001 - private API: the name is a note, not a requirement
        return "unknown"


def attention_status(grid: AttentionGrid, seq: int, heads: int, head_dim: int, gqa: int, elem: int) -> str | None:
    if heads < gqa or heads % gqa:
        return "infeasible"
    if WORK["attention.fwd"]({"seq": seq, "heads": heads, "head_dim": head_dim}, elem) > grid.flop_cap:
        return "flop_cap"
    # q, k, v, out, their gradients and dout: at most 8 tensors of [heads, seq, head_dim]
    return "memory_cap" if 8 * heads * seq * head_dim * elem > grid.memory_cap_bytes else None


def measure_attention(grid: AttentionGrid, device: torch.device, dtype: torch.dtype, timer: KernelTimer, flops: float,
                      max_inner: int, deadline: float, tick: Tick) -> tuple[Section, str]:
    sec, elem = new_section(), torch.empty((), dtype=dtype).element_size()
    native = sdpa_has_gqa()
    points = sorted(itertools.product(grid.seq, grid.heads, grid.head_dim, grid.gqa),
                    key=lambda p: (p[0] ** 2 * p[1] * p[2], p))
    for i, (s, h, d, g) in enumerate(points):
        point = (s, h, d, g)
        status = attention_status(grid, s, h, d, g, elem) or ("budget" if time.monotonic() > deadline else None)
        if status:
            for phase in ("fwd", "bwd"):
                sec.mark(phase, point, status)
            continue
        try:
            q = torch.randn(1, h, s, d, device=device, dtype=dtype, requires_grad=True)
            kv_heads = h // g if native else h
            k, v = (torch.randn(1, kv_heads, s, d, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
            gqa_kw = {"enable_gqa": True} if native and g > 1 else {}
            backend = _backend(q, k, v, gqa_kw)
            if backend == "math" and 4 * h * s * s * 4 > grid.memory_cap_bytes:  # fp32 scores, weights and grads
                for phase in ("fwd", "bwd"):
                    sec.mark(phase, point, "memory_cap")
                continue
            dout, state = torch.randn_like(q), {}

            def fwd():
                return Fn.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa_kw)

            def prepare():
                state["out"] = fwd()

            def bwd():
                return torch.autograd.grad(state["out"], (q, k, v), dout, retain_graph=True)

            est = max(WORK["attention.fwd"]({"seq": s, "heads": h, "head_dim": d}, elem) / (ATTENTION_RATE * flops),
                      MIN_KERNEL_S)
            _record(sec, "fwd", point, ATTENTION_AXES, timer.measure(fwd, est, max_inner, kind="attention.fwd"),
                    backend=backend)
            _record(sec, "bwd", point, ATTENTION_AXES,
                    timer.measure(bwd, 2.5 * est, max_inner, prepare, kind="attention.bwd"), backend=backend)
        except Exception as exc:  # noqa: BLE001
            sec.fail(exc, device)
            for phase in ("fwd", "bwd"):
                if point not in sec.seconds.get(phase, {}):
                    sec.mark(phase, point, "failed")
        finally:
            state = q = k = v = dout = None
        tick(f"attention {i + 1}/{len(points)} points")
    return sec, "enable_gqa" if native else "expanded K/V (modeling.py's repeat_interleave, outside the timing)"


# ---- memory-bound kernels -----------------------------------------------------------------------------------------


def _op(op: str, rows: int, width: int, fixed: dict, device: torch.device, dtype: torch.dtype):
    """(forward, the tensors its backward differentiates) of one memory-bound op as planner/build/modeling.py runs it."""
    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)

    if op in ("layer_norm", "rms_norm"):
        mod = (nn.LayerNorm(width, eps=LAYER_NORM_EPS) if op == "layer_norm" else RMSNorm(width)).to(device, dtype)
        x = r(rows, width)
        return (lambda: mod(x)), (x, *mod.parameters())
    if op == "rotary":  # q or k as the attention core holds them: [batch, heads, seq, head_dim]
        x = r(1, fixed["heads"], rows // fixed["heads"], width)
        return (lambda: apply_rotary(x)), (x,)
    if op == "swiglu":
        gate, up = r(rows, width), r(rows, width)
        return (lambda: Fn.silu(gate) * up), (gate, up)
    if op == "gelu":  # GPT-2's tanh approximation
        x = r(rows, width)
        return (lambda: Fn.gelu(x, approximate="tanh")), (x,)
    if op == "add":
        x, y = r(rows, width), r(rows, width)
        return (lambda: x + y), ()
    if op == "dropout":
        x = r(rows, width)
        return (lambda: Fn.dropout(x, p=DROPOUT_P, training=True)), (x,)
    if op == "cross_entropy":  # width = vocabulary; modeling.lm_loss casts the logits to float32 first
        logits, targets = r(1, rows, width), torch.randint(0, width, (1, rows), device=device)
        return (lambda: lm_loss(logits, targets)), (logits,)
    if op == "gqa_expand":  # K or V [1, kv heads, seq, head_dim] repeated for each group of query heads
        x = r(1, fixed["kv_heads"], rows // fixed["kv_heads"], width)
        return (lambda: x.repeat_interleave(fixed["groups"], dim=1)), (x,)
    if op == "embedding":  # width = vocabulary, rows = tokens
        emb = nn.Embedding(width, fixed["hidden"]).to(device, dtype)
        tokens = torch.randint(0, width, (rows,), device=device)
        return (lambda: emb(tokens)), (emb.weight,)
    raise ValueError(op)


def memory_status(grid: MemoryGrid, op: str, rows: int, width: int, elem: int) -> str | None:
    fixed = grid.fixed.get(op, {})
    if rows % fixed.get("heads", 1) or rows % fixed.get("kv_heads", 1):
        return "infeasible"
    shape = {"rows": rows, "width": width, **fixed}
    moved = max(WORK[k](shape, elem) for k in (f"{op}.fwd", f"{op}.bwd") if k in WORK)
    return "memory_cap" if moved > grid.bytes_cap else None


def measure_memory_bound(grid: MemoryGrid, device: torch.device, dtype: torch.dtype, timer: KernelTimer, bw: float,
                         max_inner: int, deadline: float, tick: Tick) -> Section:
    sec, elem = new_section(), torch.empty((), dtype=dtype).element_size()
    points = sorted(((op, w, r) for op, widths in grid.widths.items() for w in widths for r in grid.rows),
                    key=lambda p: (p[1] * p[2], p))
    for i, (op, width, rows) in enumerate(points):
        point, phases = (width, rows), [p for p in ("fwd", "bwd") if f"{op}.{p}" in WORK]
        status = memory_status(grid, op, rows, width, elem) or ("budget" if time.monotonic() > deadline else None)
        if status:
            for phase in phases:
                sec.mark(f"{op}.{phase}", point, status)
            continue
        fwd = inputs = out = dout = None
        try:
            fwd, inputs = _op(op, rows, width, grid.fixed.get(op, {}), device, dtype)
            shape = {"rows": rows, "width": width, **grid.fixed.get(op, {})}
            for phase in phases:
                est = max(WORK[f"{op}.{phase}"](shape, elem) / bw, 5 * MIN_KERNEL_S)
                state = {}
                if phase == "fwd":
                    result = timer.measure(fwd, est, max_inner, kind=f"{op}.fwd", capture=False)
                else:
                    out = fwd()
                    dout = torch.randn_like(out)

                    def prepare():
                        state["out"] = fwd()

                    def bwd():
                        return torch.autograd.grad(state["out"], inputs, dout, retain_graph=True)

                    result = timer.measure(bwd, est, max_inner, prepare, kind=f"{op}.bwd", capture=False)
                _record(sec, f"{op}.{phase}", point, MB_AXES, result)
        except Exception as exc:  # noqa: BLE001
            sec.fail(exc, device)
            for phase in phases:
                if point not in sec.seconds.get(f"{op}.{phase}", {}):
                    sec.mark(f"{op}.{phase}", point, "failed")
        finally:
            fwd = inputs = out = dout = state = None
        tick(f"memory-bound {i + 1}/{len(points)} points")
    return sec
