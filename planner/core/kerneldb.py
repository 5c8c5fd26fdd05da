"""The measured kernel database of one GPU (configs/hardware/<gpu>.yaml, written by `distplan profile --hardware`):
load it, validate it, and answer "how long does this kernel take" by interpolating over what was measured.

What it holds (the file's plain form, `version: 1`): GEMM seconds per layout on a tensor-product grid of
(m, n, k) = (tokens, out features, in features) of an nn.Linear, whose three training GEMMs are `fwd` (x @ W.T),
`dgrad` (dy @ W) and `wgrad` (dy.T @ x), each 2 m n k FLOPs, and on a second grid of odd n (`gemm_unaligned`); causal SDPA seconds on a grid of (seq, heads,
head_dim, gqa), heads being batch x query heads per GPU; memory-bound kernels as seconds on a grid of (rows,
width); the launch overhead, AdamW seconds per parameter and the sustained SM clock. A grid point that was not
measured holds the reason instead of seconds (MISSING).

How a query is answered: each grid point's rate is work / seconds (FLOPs or bytes per second, WORK below); the
log of the rate is interpolated multilinearly in log2 of every axis. Inside the grid that is the same as
interpolating log(seconds) (log work is linear in the log2 axes), so every measured point comes back exactly and
a quantity monotone over the grid stays monotone between its points. Outside the grid nothing is silent (house
rule 12): below an axis's smallest value the time is held at the edge (a smaller kernel is not faster than the
latency floor measured there); above the largest the rate is held (time grows with the work: the compute- or
bandwidth-bound plateau); an unmeasured grid point takes the best rate measured at a shape no larger on any axis
(past the FLOP or memory cap, where the rate has plateaued). Any of these makes the provenance "extrapolated (...)"
naming the axis or the reason; otherwise it is "database".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from planner.core import fields as F
from planner.core.errors import DistplanError
from planner.core.fileio import read_yaml

VERSION = 1
KIND = "distplan kernel database"
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ALIGN_BYTES = 16  # rows cuBLAS's tensor-core kernels read in 16-byte vectors (NVIDIA's matrix-multiplication guide)
GEMM_LAYOUTS = ("fwd", "dgrad", "wgrad")  # x @ W.T, dy @ W, dy.T @ x (torch.nn.Linear's forward and backward)
ATTENTION_PHASES = ("fwd", "bwd")
# why a grid point holds no seconds
MISSING = {
    "flop_cap": "past the FLOP cap",
    "memory_cap": "past the memory cap",
    "budget": "not reached within the time budget",
    "failed": "failed to run",
    "infeasible": "no such shape (fewer heads than the GQA ratio)",
}


def _gemm_flops(s: dict, b: int) -> float:
    return 2.0 * s["m"] * s["n"] * s["k"]


def _attention_flops(s: dict, b: int) -> float:
    # causal: QK^T and PV (2 matmuls of 2 s^2 d FLOPs per head), half of the scores masked (FlashAttention's count)
    return 2.0 * s["seq"] ** 2 * s["head_dim"] * s["heads"]


def _rw(reads: float, writes: float, mask_bytes: float = 0.0):
    """Bytes of a kernel that reads `reads` and writes `writes` tensors of rows x width elements of the dtype,
    plus `mask_bytes` bytes per element (dropout's bool mask)."""
    return lambda s, b: (b * (reads + writes) + mask_bytes) * s["rows"] * s["width"]


# work per grid: FLOPs for GEMMs and attention; for memory-bound kernels the bytes a fused kernel must move (each
# input read once, each output written once), whatever the implementation measured moves: its achieved bytes/s
# then says how far it is from one pass over memory
WORK = {
    "gemm": _gemm_flops,
    "attention.fwd": _attention_flops,
    "attention.bwd": lambda s, b: 2.5 * _attention_flops(s, b),  # 5 matmuls against forward's 2 (FlashAttention-2, sec. 3)
    "layer_norm.fwd": _rw(1, 1),  # x -> y
    "layer_norm.bwd": _rw(2, 1),  # dy, x -> dx (the weight and bias gradients are per width: left out)
    "rms_norm.fwd": _rw(1, 1),
    "rms_norm.bwd": _rw(2, 1),
    "rotary.fwd": _rw(1, 1),  # q or k [heads * seq rows, head_dim]
    "rotary.bwd": _rw(1, 1),
    "swiglu.fwd": _rw(2, 1),  # gate, up -> silu(gate) * up
    "swiglu.bwd": _rw(3, 2),  # dout, gate, up -> dgate, dup
    "gelu.fwd": _rw(1, 1),
    "gelu.bwd": _rw(2, 1),
    "add.fwd": _rw(2, 1),  # residual add; its backward passes the gradient through without a kernel
    "dropout.fwd": _rw(1, 1, mask_bytes=1),  # x -> y and a bool mask
    "dropout.bwd": _rw(1, 1, mask_bytes=1),  # dy, mask -> dx
    "cross_entropy.fwd": _rw(1, 0),  # logits [tokens, vocab] read once; the loss is one number per row
    "cross_entropy.bwd": _rw(1, 1),  # logits -> dlogits
    "gqa_expand.fwd": lambda s, b: b * s["rows"] * s["width"] * (1 + s["groups"]),  # K or V [kv rows, head_dim] -> groups copies
    "gqa_expand.bwd": lambda s, b: b * s["rows"] * s["width"] * (1 + s["groups"]),  # the copies' gradients summed back
    "embedding.fwd": lambda s, b: 2 * b * s["rows"] * s["hidden"],  # rows of the table -> [tokens, hidden]
    "embedding.bwd": lambda s, b: b * s["hidden"] * (s["rows"] + s["width"]),  # dy read, the [vocab, hidden] gradient written
}
MEMORY_BOUND = tuple(k for k in WORK if k not in ("gemm", "attention.fwd", "attention.bwd"))
GEMM_AXES = ("m", "n", "k")
ATTENTION_AXES = ("seq", "heads", "head_dim", "gqa")
MB_AXES = ("width", "rows")  # every memory-bound kernel: width (hidden, ffn, head_dim or vocab) x rows


def _fmt(x: float) -> str:
    return f"{x:g}" if x < 1e6 else f"{x:.4g}"


@dataclass(frozen=True)
class Grid:
    """Seconds over a tensor-product grid: `values[i]` are axis `axes[i]`'s points (ascending, > 0); `seconds` is
    row-major over them, a float where measured, a MISSING code where not. `fixed` are the kernel's parameters
    that are not axes (e.g. the hidden size of the embedding's gradient)."""

    name: str
    work: str
    axes: tuple[str, ...]
    values: tuple[tuple[float, ...], ...]
    seconds: tuple[float | str, ...]
    dtype_bytes: int
    fixed: tuple[tuple[str, float], ...] = ()
    log_rate: tuple[float, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        shape = [len(v) for v in self.values]
        strides = [math.prod(shape[i + 1:]) for i in range(len(shape))]
        own = [math.log(self._work(self._point(i)) / s) if not isinstance(s, str) else -math.inf
               for i, s in enumerate(self.seconds)]
        if all(r == -math.inf for r in own):
            raise DistplanError(f"{self.name}: no grid point was measured")
        best = list(own)  # the best rate at a shape no larger on any axis; row-major order sees those first
        for idx in range(len(best)):
            for a in range(len(shape)):
                if (idx // strides[a]) % shape[a] > 0:
                    best[idx] = max(best[idx], best[idx - strides[a]])
        slowest = min(r for r in own if r > -math.inf)  # nothing measured below: the slowest rate measured anywhere
        log_rate = [o if o > -math.inf else b if b > -math.inf else slowest for o, b in zip(own, best)]
        object.__setattr__(self, "log_rate", tuple(log_rate))

    def _point(self, idx: int) -> dict:
        coords = {}
        for axis, vals in zip(reversed(self.axes), reversed(self.values)):
            idx, i = divmod(idx, len(vals))
            coords[axis] = vals[i]
        return coords

    def _work(self, coords: dict) -> float:
        return WORK[self.work]({**dict(self.fixed), **coords}, self.dtype_bytes)

    def time_s(self, **shape: float) -> tuple[float, str]:
        """(seconds, provenance) of the kernel at `shape` (every axis; a fixed parameter may be given too)."""
        notes, cell, clamped = [], [], {}
        for axis, vals in zip(self.axes, self.values):
            if axis not in shape:
                raise DistplanError(f"{self.name}: give {', '.join(self.axes)}; '{axis}' is missing")
            x = shape[axis]
            if not F.is_number(x) or x <= 0:
                raise DistplanError(f"{self.name}: {axis} must be a number > 0, got {F.short(x)}")
            lo, hi = vals[0], vals[-1]
            if x < lo:
                notes.append(f"{axis} {_fmt(x)} below the grid's {_fmt(lo)}-{_fmt(hi)}: time held at {_fmt(lo)}")
            elif x > hi:
                notes.append(f"{axis} {_fmt(x)} above the grid's {_fmt(lo)}-{_fmt(hi)}: rate held at {_fmt(hi)}")
            c = min(max(x, lo), hi)
            clamped[axis] = c
            i = max(j for j, v in enumerate(vals) if v <= c)
            if i == len(vals) - 1 or vals[i] == c:
                cell.append(((i, 1.0),))
            else:
                f = (math.log2(c) - math.log2(vals[i])) / (math.log2(vals[i + 1]) - math.log2(vals[i]))
                cell.append(((i, 1.0 - f), (i + 1, f)))
        for key, value in dict(self.fixed).items():
            if key in shape and not (F.is_number(shape[key]) and shape[key] > 0):
                raise DistplanError(f"{self.name}: {key} must be a number > 0, got {F.short(shape[key])}")
            if key in shape and shape[key] != value:
                notes.append(f"{key} {_fmt(shape[key])}: rate measured at {key} {_fmt(value)}")
        unknown = set(shape) - set(self.axes) - {k for k, _ in self.fixed}
        if unknown:
            raise DistplanError(f"{self.name}: unknown shape key(s) {', '.join(sorted(unknown))}; "
                                f"valid: {', '.join([*self.axes, *(k for k, _ in self.fixed)])}")
        log_rate, missing = 0.0, set()
        vertices = [((), 1.0)]
        for options in cell:
            vertices = [((*ix, i), w * wi) for ix, w in vertices for i, wi in options if wi > 0]
        for ix, w in vertices:
            flat = sum(i * math.prod(len(v) for v in self.values[a + 1:]) for a, i in enumerate(ix))
            sec = self.seconds[flat]
            if isinstance(sec, str):
                missing.add(sec)
            elif len(vertices) == 1 and not notes:
                return float(sec), "database"  # a measured grid point, exactly as stored
            log_rate += w * self.log_rate[flat]
        notes += [f"{MISSING[m]}: rate held at the best measured at a smaller shape" for m in sorted(missing)]
        # axes above the grid keep their own size in the work (rate held), axes below keep the edge's (time held)
        work_at = {a: (shape[a] if shape[a] > clamped[a] else clamped[a]) for a in self.axes}
        fixed = {k: shape.get(k, v) for k, v in self.fixed}
        seconds = WORK[self.work]({**fixed, **work_at}, self.dtype_bytes) / math.exp(log_rate)
        return seconds, ("extrapolated (" + "; ".join(notes) + ")") if notes else "database"

    def rate(self, **shape: float) -> tuple[float, str]:
        """(work per second, provenance) at `shape`: FLOP/s for GEMMs and attention, bytes/s for the rest."""
        seconds, prov = self.time_s(**shape)
        fixed = {k: shape.get(k, v) for k, v in self.fixed}
        return WORK[self.work]({**fixed, **{a: shape[a] for a in self.axes}}, self.dtype_bytes) / seconds, prov


@dataclass(frozen=True)
class KernelDB:
    source: str
    gpu_name: str
    device: str
    dtype: str
    facts: dict
    gemm: dict  # layout -> Grid
    gemm_unaligned: dict  # layout -> Grid over odd n (empty where not measured)
    attention: dict  # phase -> Grid
    memory_bound: dict  # kernel -> Grid
    launch: dict  # eager_op_s, graph_kernel_s, eager_roundtrip_s (None where not measured)
    adamw: float | None
    clock: dict  # sustained_sm_mhz, power_w, samples, max_sm_mhz (None where not measured)
    not_measured: dict  # section -> why
    # prices already computed from this database (planner/cost/kernels.py): a solve asks for the same kernels of the
    # same shapes for thousands of configurations; no effect on any answer
    memo: dict = field(default_factory=dict, compare=False, repr=False)

    def _section(self, name: str, grids: dict, key: str, valid: tuple) -> Grid:
        if not grids:
            raise DistplanError(f"{self.source} has no {name} measurements"
                                f" ({self.not_measured.get(name, 'absent from the file')})")
        if key not in grids:
            raise DistplanError(f"{self.source}: {name} '{key}' is unknown; valid: {', '.join(valid)}")
        return grids[key]

    def aligned(self, width: float) -> bool:
        """Whether rows of `width` elements keep the 16-byte alignment cuBLAS's fast kernels need."""
        return float(width).is_integer() and int(width) % (ALIGN_BYTES // DTYPE_BYTES[self.dtype]) == 0

    def gemm_time_s(self, m: float, n: float, k: float, layout: str = "fwd") -> tuple[float, str]:
        """Seconds of one GEMM of nn.Linear(in=k, out=n) on m tokens: fwd x @ W.T, dgrad dy @ W, wgrad dy.T @ x.
        An unaligned n (GPT-2's 50,257 vocabulary) reads the unaligned grid where it was measured; an unaligned k,
        or n without that grid, is priced at the aligned rate and said to be extrapolated."""
        odd_grid = not self.aligned(n) and layout in self.gemm_unaligned
        if odd_grid:
            s, prov = self.gemm_unaligned[layout].time_s(m=m, n=n, k=k)
        else:
            s, prov = self._section("gemm", self.gemm, layout, GEMM_LAYOUTS).time_s(m=m, n=n, k=k)
        odd = [f"{a} {_fmt(x)}" for a, x in (("n", n), ("k", k)) if not self.aligned(x) and not (a == "n" and odd_grid)]
        if odd:
            note = (f"{', '.join(odd)} not a multiple of {ALIGN_BYTES // DTYPE_BYTES[self.dtype]}: priced at the "
                    f"{'odd-n' if odd_grid else 'aligned'} grid's rate")
            prov = f"extrapolated ({note}{'; ' + prov[len('extrapolated ('):-1] if prov != 'database' else ''})"
        return s, prov

    def attention_time_s(self, seq: float, heads: float, head_dim: float, gqa: float = 1,
                         phase: str = "fwd") -> tuple[float, str]:
        """Seconds of causal SDPA over `heads` = batch x query heads per GPU, each `gqa` sharing one K/V head."""
        grid = self._section("attention", self.attention, phase, ATTENTION_PHASES)
        lo = grid.values[grid.axes.index("seq")][0]
        if not (F.is_number(seq) and 0 < seq < lo and F.is_number(heads) and heads > 0):
            return grid.time_s(seq=seq, heads=heads, head_dim=head_dim, gqa=gqa)
        # below the sequence grid: the same causal work (heads x seq^2) as fewer heads at the grid's shortest sequence
        # (holding the time at that edge would charge (lo / seq)^2 times the work: 16x for a ViT's 257 patches)
        equivalent = heads * (seq / lo) ** 2
        seconds, prov = grid.time_s(seq=lo, heads=equivalent, head_dim=head_dim, gqa=gqa)
        note = (f"seq {_fmt(seq)} below the grid's {_fmt(lo)}: priced as seq {_fmt(lo)} over {equivalent:.3g} heads, "
                "the same causal work")
        inner = prov[len("extrapolated ("):-1] if prov.startswith("extrapolated (") else ""
        return seconds, f"extrapolated ({note}{'; ' + inner if inner else ''})"

    def memory_bound_time_s(self, kernel: str, **shape: float) -> tuple[float, str]:
        """Seconds of a memory-bound kernel ('rms_norm.fwd', ...) at shape rows=..., width=... (WORK says the bytes)."""
        return self._section("memory_bound", self.memory_bound, kernel, tuple(self.memory_bound)).time_s(**shape)

    def memory_bound_bytes_per_s(self, kernel: str, **shape: float) -> tuple[float, str]:
        """Achieved bytes/s (WORK's bytes over the measured time) of a memory-bound kernel at `shape`."""
        return self._section("memory_bound", self.memory_bound, kernel, tuple(self.memory_bound)).rate(**shape)

    def _scalar(self, section: str, value: float | None, what: str) -> tuple[float, str]:
        if value is None:
            raise DistplanError(f"{self.source} has no {what} "
                                f"({self.not_measured.get(section, 'not measured')})")
        return value, "database"

    def launch_overhead_s(self) -> tuple[float, str]:
        """Host seconds per eager kernel launch (a layer of small kernels pays this when the GPU outruns the host)."""
        return self._scalar("launch", self.launch.get("eager_op_s"), "launch overhead")

    def adamw_s_per_param(self) -> tuple[float, str]:
        return self._scalar("optimizer", self.adamw, "AdamW step rate")

    def sustained_clock_mhz(self) -> tuple[float, str]:
        return self._scalar("clock", self.clock.get("sustained_sm_mhz"), "sustained clock")


# ---- reading -------------------------------------------------------------------------------------------------


def _axis(values: object, where: str, name: str) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise DistplanError(f"{where}.axes.{name} must be a non-empty list of numbers > 0, got {F.short(values)}")
    out = tuple(F.check_number(v, name, f"{where}.axes", 0, above=True) for v in values)
    if any(b <= a for a, b in zip(out, out[1:])):
        raise DistplanError(f"{where}.axes.{name} must be ascending without repeats, got {F.short(values)}")
    return out


def _leaves(nested: object, shape: list[int], where: str) -> list[float | str]:
    """The row-major leaves of nested lists of `shape`: seconds > 0 or a MISSING code."""
    todo, out = [(nested, where, 0)], []
    while todo:
        value, at, depth = todo.pop()
        if depth == len(shape):
            if isinstance(value, str) and value in MISSING:
                out.append(value)
            elif F.is_number(value) and value > 0:
                out.append(float(value))
            else:
                raise DistplanError(f"{at} must be seconds > 0 or one of {', '.join(MISSING)}, got {F.short(value)}")
            continue
        if not isinstance(value, list) or len(value) != shape[depth]:
            raise DistplanError(f"{at} must be a list of {shape[depth]} (the grid's axis {depth + 1}), got {F.short(value)}")
        todo.extend((v, f"{at}[{i}]", depth + 1) for i, v in reversed(list(enumerate(value))))
    return out


def _axes(values: object, where: str, axes: tuple[str, ...]) -> list[tuple[float, ...]]:
    return [_axis(F.listing(values, a, f"{where}.axes"), where, a) for a in axes]


def _grid(d: object, where: str, name: str, work: str, axes: tuple[str, ...], vals: list, dtype_bytes: int,
          fixed: tuple = ()) -> Grid:
    seconds = _leaves(d, [len(v) for v in vals], where)
    return Grid(name=name, work=work, axes=axes, values=tuple(vals), seconds=tuple(seconds),
                dtype_bytes=dtype_bytes, fixed=fixed)


def _grids(data: dict, section: str, source: str, b: int) -> tuple[dict, str | None]:
    """{key: Grid} of one section, or ({}, why) when the file says it was not measured."""
    where = f"{source}: {section}"
    sec = F.mapping(data, section, source, default=None)
    if sec is None:
        return {}, None
    if "not_measured" in sec:
        return {}, F.text(sec, "not_measured", where)
    out = {}
    if section == "memory_bound":
        for kernel, k in F.mapping(sec, "kernels", where).items():
            if kernel not in MEMORY_BOUND:
                raise DistplanError(f"{where}.kernels: '{kernel}' is unknown; valid: {', '.join(MEMORY_BOUND)}")
            kw = f"{where}.kernels.{kernel}"
            fixed = tuple((n, F.check_number(v, n, f"{kw}.fixed", 0, above=True))
                          for n, v in F.mapping(k, "fixed", kw, default={}).items())
            vals = _axes(F.mapping(k, "axes", kw), kw, MB_AXES)
            out[kernel] = _grid(F.listing(k, "seconds", kw), f"{kw}.seconds", f"{source} {kernel}", kernel, MB_AXES,
                                vals, b, fixed)
        return out, None
    gemm = section.startswith("gemm")
    axes, keys, work = (GEMM_AXES, GEMM_LAYOUTS, "gemm") if gemm else (ATTENTION_AXES, ATTENTION_PHASES, "attention")
    vals = _axes(F.mapping(sec, "axes", where), where, axes)
    per = F.mapping(sec, "seconds", where)
    for key in keys:
        work_key = work if gemm else f"attention.{key}"
        out[key] = _grid(F.listing(per, key, f"{where}.seconds"), f"{where}.seconds.{key}", f"{source} {section} {key}",
                         work_key, axes, vals, b)
    return out, None


def kernel_db_from_dict(data: dict, source: str) -> KernelDB:
    if data.get("version") != VERSION or isinstance(data.get("version"), bool):
        raise DistplanError(f"{source}: 'version' must be {VERSION} (the kernel database format this distplan reads), "
                            f"got {F.short(data.get('version'))}")
    F.text(data, "kind", source, choices=(KIND,))
    device = F.text(data, "device", source, choices=("cuda", "cpu"))
    dtype = F.text(data, "dtype", source, choices=tuple(DTYPE_BYTES))
    b = DTYPE_BYTES[dtype]
    not_measured = {}
    sections = {}
    for section in ("gemm", "gemm_unaligned", "attention", "memory_bound"):
        sections[section], why = _grids(data, section, source, b)
        if why:
            not_measured[section] = why
    launch = F.mapping(data, "launch", source, default={})
    launch = {k: (F.number(launch, k, f"{source}: launch", 0, above=True, default=None))
              for k in ("eager_op_s", "graph_kernel_s", "eager_roundtrip_s")}
    opt = F.mapping(data, "optimizer", source, default={})
    adamw = F.number(opt, "adamw_s_per_param", f"{source}: optimizer", 0, above=True, default=None)
    clock = F.mapping(data, "clock", source, default={})
    clock = {k: F.number(clock, k, f"{source}: clock", 0, default=None)
             for k in ("sustained_sm_mhz", "power_w", "samples", "max_sm_mhz")}
    for section in ("launch", "optimizer", "clock"):
        why = (data.get(section) or {}).get("not_measured") if isinstance(data.get(section), dict) else None
        if why is not None:
            not_measured[section] = F.text(data[section], "not_measured", f"{source}: {section}")
    return KernelDB(source=source, gpu_name=F.name(data, "gpu_name", source), device=device, dtype=dtype,
                    facts=F.mapping(data, "facts", source, default={}), gemm=sections["gemm"],
                    gemm_unaligned=sections["gemm_unaligned"],
                    attention=sections["attention"], memory_bound=sections["memory_bound"], launch=launch,
                    adamw=adamw, clock=clock, not_measured=not_measured)


def hardware_dir() -> Path:
    return Path(str(resources.files("configs") / "hardware"))


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the file name of a GPU's database."""
    return re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-") or "gpu"


def available_databases() -> dict[str, Path]:
    """{name: path} of the kernel databases committed under configs/hardware/."""
    root = hardware_dir()
    return {p.stem: p for p in sorted(root.glob("*.yaml"))} if root.is_dir() else {}


def load_kernel_db(name_or_path: str | Path) -> KernelDB:
    """A database by name (configs/hardware/<name>.yaml) or path."""
    known = available_databases()
    path = known.get(str(name_or_path), Path(name_or_path))
    hint = f"; committed databases: {', '.join(known) or 'none'}"
    return kernel_db_from_dict(read_yaml(path, "kernel database", hint=hint), f"kernel database '{path}'")
