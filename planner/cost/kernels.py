"""A layer's time from the GPU's measured kernel database (planner/core/kerneldb.py): kernel by kernel.

Without a profile the cost model prices a block, the LM head and the embedding from the kernels the runners
execute (planner/build/modeling.py's modules, one micro-batch, on this GPU's shard):
- every nn.Linear as its three GEMMs, fwd `x @ W.T` in the forward, dgrad `dy @ W` and wgrad `dy.T @ x` in the
  backward, at the shard's (tokens, out features, in features);
- causal SDPA over the local heads (GQA's K/V expanded first, as the modules do, so the kernel sees whole heads);
  forward, and backward;
- the memory-bound kernels (norms, rotary, SwiGLU or GeLU, residual adds, dropout, GQA's K/V copies, the fp32
  cross-entropy, the embedding's gather and its gradient) as bytes moved / the bytes per second the database
  measured at that shape;
- each phase is the larger of its kernels' GPU time and the host's time to launch them (kernels x the measured
  eager launch overhead): a small layer runs at the host's pace.
Each price carries its provenance; a shape outside the measured grid names the axis (kerneldb's rules) and
`provenance` returns those notes, so a prediction says where it extrapolated.

Pure: the database is data on the cluster (Cluster.kernels), loaded with the cluster file.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.core.cluster import Cluster
from planner.core.job import ParallelConfig
from planner.core.kerneldb import DTYPE_BYTES, WORK
from planner.core.model import ModelSpec
from planner.cost.terms import fused_attention_time_s, gemm_time_s, memory_bound_time_s



@dataclass(frozen=True)
class Kernel:
    """One kernel of one phase: `kind` "gemm" (shape m, n, k; `key` the layout), "attention" (seq, heads,
    head_dim, gqa; `key` fwd/bwd), "memory" (`key` a kerneldb.WORK name such as "rms_norm.fwd"; shape rows,
    width and the kernel's fixed parameters) or "stream" (the unfused softmax over rows x width scores, not in the
    database: priced at the residual add's measured bytes/s); `calls` identical launches."""

    kind: str
    key: str
    shape: tuple[tuple[str, float], ...]
    calls: float = 1.0
    core: bool = False  # part of the attention core (what ring attention overlaps, selective recompute repeats)


@dataclass(frozen=True)
class Priced:
    """Seconds of a list of kernels: GPU time, launches, and the provenance notes of the prices that were not
    measured points or interpolations between them."""

    gpu_s: float
    launches: float
    notes: tuple[str, ...]

    def seconds(self, launch_s: float) -> float:
        return max(self.gpu_s, self.launches * launch_s)


def _k(kind: str, key: str, calls: float = 1.0, core: bool = False, **shape: float) -> Kernel:
    return Kernel(kind, key, tuple(sorted(shape.items())), calls, core)


def linear(phase: str, m: float, n: float, k: float, calls: float = 1.0) -> list[Kernel]:
    """nn.Linear(in=k, out=n) on m tokens: its forward GEMM, or its two backward GEMMs."""
    if phase == "fwd":
        return [_k("gemm", "fwd", calls, m=m, n=n, k=k)]
    return [_k("gemm", "dgrad", calls, m=m, n=n, k=k), _k("gemm", "wgrad", calls, m=m, n=n, k=k)]


def memory(kernel: str, phase: str, rows: float, width: float, calls: float = 1.0, **fixed: float) -> list[Kernel]:
    key = f"{kernel}.{phase}"
    return [_k("memory", key, calls, rows=rows, width=width, **fixed)] if key in WORK else []


def _norm(model: ModelSpec) -> str:
    return "layer_norm" if model.family in ("gpt", "vit") else "rms_norm"


def block_kernels(model: ModelSpec, cfg: ParallelConfig, phase: str) -> list[Kernel]:
    """The kernels of one dense or MoE block's `phase` ("fwd" or "bwd") for one micro-batch on one GPU."""
    t, b = cfg.tp, cfg.micro_batch_size
    s = cfg.seq_len / cfg.cp
    tokens = b * s
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    rep = tokens / (t if cfg.sequence_parallel else 1)  # norms, adds and dropout: sharded only with SP
    heads, kv_heads = model.num_heads / t, model.num_kv_heads / t
    groups = model.num_heads / model.num_kv_heads
    out: list[Kernel] = []
    for _ in range(2):  # the attention and the MLP half: a norm, the residual add and its dropout
        out += memory(_norm(model), phase, rep, h)
        out += memory("add", "fwd", rep, h)  # forward: x + y; backward: the residual's two gradients summed
        if model.dropout > 0:
            out += memory("dropout", phase, rep, h)
    out += linear(phase, tokens, h / t, h) + linear(phase, tokens, model.kv_dim / t, h, calls=2)  # q_proj; k_, v_proj
    if not model.learned_positions:
        out += memory("rotary", phase, b * (heads + kv_heads) * s, d)  # q and k [batch x heads x seq, head_dim]
    if groups > 1:
        out += memory("gqa_expand", phase, b * kv_heads * s, d, calls=2, groups=groups)  # K and V
    if cfg.flash_attention:
        # cp > 1, ring attention with the causal load balanced: the local queries meet every earlier key chunk, the
        # causal total / cp, run as cp kernels of the local chunk's causal work; (cp - 1) merges of the partial
        # outputs (online softmax: read both, write one)
        out.append(_k("attention", phase, calls=cfg.cp, core=True, seq=s, heads=b * heads, head_dim=d, gqa=1))
        if cfg.cp > 1:
            out += memory("add", "fwd", tokens, h / t, calls=cfg.cp - 1)
    else:  # unfused core: batched GEMMs over batch x heads (one kernel each, its m the batch's rows): scores
        # S = Q K^T [s x keys, inner d], out = P V [s x d, inner keys]; backward dS = dO V^T (S's shape) and dV = P^T dO,
        # dQ = dS K, dK = dS^T Q (out's shape); the s x keys softmax between them
        rows, keys = b * heads * s, cfg.seq_len
        out.append(_k("gemm", "fwd", 1, core=True, m=rows, n=keys, k=d))
        out.append(_k("gemm", "fwd", 1 if phase == "fwd" else 3, core=True, m=rows, n=d, k=keys))
        out.append(_k("stream", phase, core=True, rows=rows, width=keys))  # softmax over the scores
    out += linear(phase, tokens, h, h / t)  # o_proj
    n_mlp_in = 2 if model.gated_mlp else 1  # gate_proj and up_proj, or fc1
    act = "swiglu" if model.gated_mlp else "gelu"
    if phase == "bwd":  # autograd sums the gradients of an input read twice or more: by q, k and v (2 adds), by
        # gate_proj and up_proj (1), by the router and the experts (1); each expert's gate and up inside the MoE below
        out += memory("add", "fwd", tokens, h, calls=2 + (1 if model.gated_mlp or model.is_moe else 0))
    if model.is_moe:
        expert_tokens = tokens * model.top_k * cfg.ep / model.num_experts  # balanced routing
        local = model.num_experts / cfg.ep
        out += linear(phase, tokens, model.num_experts, h)  # router
        out += linear(phase, expert_tokens, f / t, h, calls=n_mlp_in * local) + linear(phase, expert_tokens, h, f / t,
                                                                                        calls=local)
        out += memory(act, phase, tokens * model.top_k, f / t)
        if phase == "bwd":
            out += memory("add", "fwd", expert_tokens * local, h)
        out += memory("add", "fwd", tokens * model.top_k, h, calls=2)  # permutation to the experts and back
    else:
        out += linear(phase, tokens, f / t, h, calls=n_mlp_in) + linear(phase, tokens, h, f / t)  # in; down_proj or fc2
        out += memory(act, phase, tokens, f / t)
    return out


def head_kernels(model: ModelSpec, cfg: ParallelConfig, phase: str) -> list[Kernel]:
    """Final norm, LM head and the fp32 cross-entropy over the vocabulary shard (ViT: the class token's classifier)."""
    tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
    h = model.hidden_size
    if model.is_vit:
        return memory(_norm(model), phase, cfg.micro_batch_size, h) + linear(phase, cfg.micro_batch_size,
                                                                              model.vocab_size, h)
    v = model.vocab_size / cfg.tp
    return (memory(_norm(model), phase, tokens, h) + linear(phase, tokens, v, h)
            + memory("cross_entropy", phase, tokens, v))


def embedding_kernels(model: ModelSpec, cfg: ParallelConfig, phase: str) -> list[Kernel]:
    """Token lookup (+ learned positions) and, backward, the table's gradient; ViT: the patch projection."""
    tokens = cfg.micro_batch_size * cfg.seq_len / cfg.cp
    h = model.hidden_size
    if model.is_vit:
        return linear(phase, tokens, h, model.num_channels * model.patch_size ** 2)
    rows = tokens / (cfg.tp if cfg.sequence_parallel else 1)
    out = memory("embedding", phase, rows, model.vocab_size / cfg.tp, hidden=h)
    if model.learned_positions and phase == "fwd":
        out += memory("add", "fwd", rows, h)
    return out


def _preset_s(cluster: Cluster, kn: Kernel, elem: int) -> float:
    """The preset's price of a kernel the database lacks (a section that failed or was not measured)."""
    shape = dict(kn.shape)
    if kn.kind == "gemm":
        return gemm_time_s(cluster, 2 * shape["m"] * shape["n"] * shape["k"])
    if kn.kind == "attention":
        return fused_attention_time_s(cluster, WORK[f"attention.{kn.key}"](shape, elem))
    if kn.kind == "stream":
        return memory_bound_time_s(cluster, (2 if kn.key == "fwd" else 3) * elem * shape["rows"] * shape["width"])
    return memory_bound_time_s(cluster, WORK[kn.key](shape, elem))


def _price_one(cluster: Cluster, kn: Kernel) -> tuple[float, str]:
    key = (kn.kind, kn.key, kn.shape, cluster.gpu, cluster.efficiency)  # all of the cluster a price reads
    got = cluster.kernels.memo.get(key)
    if got is None:
        got = cluster.kernels.memo[key] = _price_new(cluster, kn)
    return got


def _price_new(cluster: Cluster, kn: Kernel) -> tuple[float, str]:
    db = cluster.kernels
    shape = dict(kn.shape)
    elem = DTYPE_BYTES[db.dtype]
    key = {"gemm": "gemm", "attention": "attention"}.get(kn.kind, "memory_bound")
    have = {"gemm": db.gemm, "attention": db.attention, "memory_bound": db.memory_bound}[key]
    wanted = {"stream": "add.fwd"}.get(kn.kind, kn.key)
    if wanted not in have:
        return _preset_s(cluster, kn, elem), f"not in the database ({db.not_measured.get(key, 'not measured')}): preset"
    if kn.kind == "gemm":
        return db.gemm_time_s(shape["m"], shape["n"], shape["k"], kn.key)  # odd widths: kerneldb's unaligned grid
    if kn.kind == "attention":
        return db.attention_time_s(shape["seq"], shape["heads"], shape["head_dim"], shape["gqa"], kn.key)
    # memory-bound: this shape's bytes (WORK, with its own fixed parameters) at the rate measured near it; the
    # unfused softmax's passes (fwd: read, write; bwd: 2 reads, write) at the residual add's rate
    rate, prov = db.memory_bound_bytes_per_s(wanted, rows=shape["rows"], width=shape["width"])
    nbytes = ((2 if kn.key == "fwd" else 3) * elem * shape["rows"] * shape["width"] if kn.kind == "stream"
              else WORK[kn.key](shape, elem))
    return nbytes / rate, prov


def price(cluster: Cluster, kernels: list[Kernel]) -> Priced:
    """The kernels priced from the cluster's database (which must be set)."""
    gpu_s, launches, notes = 0.0, 0.0, []
    for kn in kernels:
        s, prov = _price_one(cluster, kn)
        gpu_s += kn.calls * s
        launches += kn.calls
        if prov != "database":
            notes.append(f"{kn.kind} {kn.key} {dict(kn.shape)}: {prov}")
    return Priced(gpu_s, launches, tuple(dict.fromkeys(notes)))


def layer_times(cluster: Cluster, kernels_of, model: ModelSpec, cfg: ParallelConfig) -> tuple[float, float]:
    """(forward, backward) seconds of one layer whose kernels `kernels_of(model, cfg, phase)` lists."""
    launch_s = cluster.kernels.launch.get("eager_op_s") or 0.0  # not measured: the GPU's time alone
    return tuple(price(cluster, kernels_of(model, cfg, ph)).seconds(launch_s) for ph in ("fwd", "bwd"))


def attention_fwd_s(cluster: Cluster, model: ModelSpec, cfg: ParallelConfig) -> float:
    """The attention core's forward GPU seconds in one block (what ring attention overlaps and selective recompute
    repeats): the fused kernel, or the unfused GEMMs and softmax."""
    return price(cluster, [kn for kn in block_kernels(model, cfg, "fwd") if kn.core]).gpu_s


def provenance(cluster: Cluster, model: ModelSpec, cfg: ParallelConfig) -> list[str]:
    """Where the database priced this configuration outside what it measured (empty: all inside its grids)."""
    if cluster.kernels is None:
        return []
    notes: list[str] = []
    for kernels_of in (block_kernels, head_kernels, embedding_kernels):
        for ph in ("fwd", "bwd"):
            notes += price(cluster, kernels_of(model, cfg, ph)).notes
    return list(dict.fromkeys(notes))


def label_sources(cluster: Cluster, model: ModelSpec, cfg: ParallelConfig,
                  sources: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """A prediction's sources with the compute terms the database priced said so ("preset" becomes "kernel
    database <gpu>"), and one `kernels.extrapolated` entry listing where it priced outside its grids."""
    db = cluster.kernels
    if db is None:
        return sources
    label = f"kernel database {db.gpu_name} ({cluster.kernel_database})"
    out = {k: (label if k.startswith("compute.") and v == "preset" else v) for k, v in sources}
    if "optimizer" not in out and db.adamw and not cfg.offload_optimizer:  # a profile's own rate says "profile"
        out["optimizer"] = label
    if label in out.values():
        notes = provenance(cluster, model, cfg)
        if notes:
            out["kernels.extrapolated"] = f"{len(notes)} kernel shapes outside the measured grid: " + "; ".join(notes[:3]) + (
                "; ..." if len(notes) > 3 else "")
    return tuple(sorted(out.items()))
