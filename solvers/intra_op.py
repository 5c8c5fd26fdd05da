"""Intra-operator parallelism: the sharding ILP of one layer kind on one logical device mesh.

Alpa (Zheng et al., OSDI'22, sec. 4.2, eq. 1): every operator v of the traced graph picks one
strategy s_v from a list; the objective adds each operator's compute and communication cost vector
c_v + d_v and, on every edge (u, v), the resharding cost R_uv(s_u, s_v) of converting u's output
into the layout v needs; subject to the per-device memory. Here, per training step of one layer:

    minimise  sum_v x_v . (m * (compute_v + comm_v) + gradsync_v)  +  m * sum reshard(u)
    s.t.      sum_s x_vs = 1 (one_strategy)          sum_v x_v . memory_v <= budget (memory)

Mesh d x t (dp x tp). Axis 0 always splits the batch: data parallelism, which is what Alpa's ILP
picks on that axis for training and what every runner does; it enters through the gradient sync
and the ZeRO sharding of model states. The ILP decides how each operator uses axis 1.
Layouts of a tensor over the t ranks of axis 1: R replicated, B batch-sharded, S sequence-sharded,
C last dim sharded (columns: hidden units, heads, vocabulary), P partial sums.

Resharding a tensor of X bytes (planner.cost.layer.CommModel, tp ranks adjacent, stride 1):
    R -> B|S|C|P free (local slice) | B|S|C -> R all_gather(X) | B|S|C -> another of them all_to_all(X/t)
    B|S|C -> P free (zero fill)     | P -> R all_reduce(X)      | P -> B|S|C reduce_scatter(X)
Forward: an output is materialised once per distinct layout its consumers need. Backward: consumers'
input gradients arrive in their own layouts (a column-split matmul sends partial sums); those of one
layout are summed locally, then each distinct layout is converted once into the layout the producer's
output gradient needs (that of P is R). So Megatron's f/g operators fall out: a norm feeding column-
split Q, K, V costs one backward all-reduce; a row-split output feeding a residual add one forward
all-reduce; with sequence-split norms these become Korthikanti's all-gather/reduce-scatter pairs.
A block's output is the next identical block's input: the layout of the layer input must equal that
of the output (`cyclic`), so identical blocks are solved once.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx

from planner.core.cluster import Cluster
from planner.cost.terms import CommModel, fused_attention_pass_s, gemm_pass_s, gemm_time_s, memory_bound_time_s
from planner.core.errors import require
from planner.cost.memory import GRAD_BYTES, zero_model_state_bytes
from planner.core.model import ModelSpec
from planner.core.profile import Profile
from solvers.milp import BACKENDS, Milp

LAYOUTS = ("R", "B", "S", "C", "P")
# canonical preference order: breaks exact ties so both backends return the same assignment
STRATEGY_ORDER = ("replicate", "column-split", "row-split", "sequence-split", "batch-split", "expert-split")
NS_PER_S = 1e9  # CP-SAT takes integer coefficients: seconds become whole nanoseconds
KIB = 1024  # ... and memory whole KiB
_SHARDED = ("B", "S", "C")


@dataclass(frozen=True)
class Strategy:
    name: str
    inputs: str  # layout every input must arrive in
    output: str  # layout of the output
    grad_in: str  # layout of the gradient sent back to the producers of the inputs
    compute_s: float  # per micro-batch: forward + backward (+ recomputed forward)
    comm_s: float  # collectives inside the operator, per micro-batch
    grad_sync_s: float  # data-parallel gradient all-reduce of its weights, per step
    memory_bytes: float  # model states (ZeRO) + stored activations, per device


@dataclass(frozen=True)
class OpNode:
    name: str
    op: str
    out_bytes: float
    strategies: tuple[Strategy, ...]


@dataclass(frozen=True)
class IntraOpProblem:
    kind: str
    dp: int
    tp: int
    nodes: tuple[OpNode, ...]
    edges: tuple[tuple[int, int], ...]  # (producer, consumer) node indices
    conversions: tuple[tuple[tuple[str, str, float], ...], ...]  # per node: (from, to, seconds) of its output
    cyclic: tuple[int, int] | None  # (layer input node, layer output node) whose layouts must agree
    microbatches: int
    forward_passes: int  # 2 under full recompute: forward conversions happen twice
    memory_budget_bytes: float


@dataclass(frozen=True)
class IntraOpCost:
    compute_s: float  # per micro-batch
    comm_s: float  # per micro-batch: resharding + collectives inside operators (the TP communication)
    grad_sync_s: float  # per step
    memory_bytes: float
    step_s: float  # the objective: microbatches * (compute + comm) + grad_sync


@dataclass(frozen=True)
class IntraOpSolution:
    kind: str
    dp: int
    tp: int
    assignment: tuple[tuple[str, str], ...]  # (operator, strategy) in graph order, the layer input first
    cost: IntraOpCost
    backend: str
    objective: int  # the integer objective the backend minimised (nanoseconds * scale + tie-break)


# ---- building the problem from a traced operator graph ---------------------------------------------


def conversion_costs(comm: CommModel, t: int, nbytes: float) -> tuple[tuple[str, str, float], ...]:
    """Seconds to convert a tensor of `nbytes` between layouts over `t` adjacent ranks (module doc)."""
    out = []
    for src in LAYOUTS:
        for dst in LAYOUTS:
            if src == dst or src == "R" or dst == "P":
                continue
            if src == "P":
                op, size = ("all_reduce", nbytes) if dst == "R" else ("reduce_scatter", nbytes)
            elif dst == "R":
                op, size = "all_gather", nbytes
            else:
                op, size = "all_to_all", nbytes / t
            out.append((src, dst, comm.time_s(op, t, 1, size)))
    return tuple(out)


def _strategies(g: nx.DiGraph, name: str, spec: ModelSpec, cluster: Cluster, comm: CommModel, d: int, t: int,
                zero_stage: int, passes: int, flash: bool, copies: float, cp: int) -> list[Strategy]:
    a = g.nodes[name]
    op, shape, w = a["op"], a["out_shape"], a["weight_shape"]
    scale = 1.0 / cp  # the graph is traced for the whole sequence; context parallelism keeps 1/cp of the tokens
    f_fwd, f_bwd, out_bytes = a["flops_fwd"] * scale, a["flops_bwd"] * scale, a["out_bytes"] * scale
    preds = sorted(g.predecessors(name), key=list(g.nodes).index)
    in_bytes = sum(g.edges[p, name]["bytes"] for p in preds) * scale
    if name in g.graph["input_nodes"]:
        in_bytes += g.graph["input_bytes"] * scale
    seq_ok = len(shape) >= 3 and (shape[1] // cp) % t == 0
    n_mlp = 3 if spec.gated_mlp else 2
    vocab = bool(w) and w[0] == spec.vocab_size  # Megatron pads the vocabulary to a multiple of tp

    options: list[tuple[str, str, str, str, int, int]] = [("replicate", "R", "R", "R", 1, 1)]  # name, in, out, grad, k, wk
    if t > 1:
        if shape[0] == g.graph["micro_batch"] and shape[0] % t == 0:
            options.append(("batch-split", "B", "B", "B", t, 1))
        if seq_ok:
            options.append(("sequence-split", "S", "S", "S", t, 1))
        if op == "matmul" and w and (w[0] % t == 0 or vocab):
            options.append(("column-split", "R", "C", "P", t, t))
        if op == "matmul" and w and len(w) == 2 and w[1] % t == 0:
            options.append(("row-split", "C", "P", "C", t, t))
        if op == "attention" and spec.num_heads % t == 0 and spec.num_kv_heads % t == 0:
            options.append(("column-split", "C", "C", "C", t, 1))  # heads split: Q, K, V arrive split by head
        if op == "elementwise" and shape[-1] % t == 0:
            options.append(("column-split", "C", "C", "C", t, 1))
        if op == "embedding" and w and (w[0] % t == 0 or vocab):
            options.append(("row-split", "R", "P", "R", 1, t))  # vocab-parallel table: partial sums (Megatron)
        if op == "experts" and spec.ffn_hidden_size % t == 0:
            options.append(("column-split", "R", "P", "P", t, t))  # every expert's ffn split column-then-row
        if op == "experts" and spec.num_experts % t == 0 and seq_ok:
            options.append(("expert-split", "S", "S", "S", t, t))
    out = []
    for sname, lin, lout, lgrad, k, wk in options:
        comm_s = 0.0
        if op in ("matmul", "router"):
            fwd, bwd = gemm_pass_s(cluster, f_fwd / k, f_bwd / k)
        elif op == "experts":
            local = spec.num_experts // (t if sname == "expert-split" else 1)
            fwd, bwd = gemm_pass_s(cluster, f_fwd / k, f_bwd / k, n_mlp * local)
            if sname == "expert-split":  # dispatch + combine all-to-all, forward and backward (top_k copies per token)
                a2a = comm.time_s("all_to_all", t, 1, g.edges[preds[0], name]["bytes"] * scale / t * spec.top_k)
                comm_s += (2 * passes + 2) * a2a
        elif op == "attention":
            if flash:
                fwd, bwd = fused_attention_pass_s(cluster, f_fwd / k * (1.0 if spec.is_vit else 0.5))  # causal skips half
            else:
                per_call = f_fwd / (2 * shape[0] * spec.num_heads) / (t if sname == "sequence-split" else 1)
                fwd = gemm_time_s(cluster, per_call, max(1, round(f_fwd / k / per_call)))
                bwd = 2 * fwd
            if sname == "sequence-split":  # every query needs all keys and values: all-gather K, V (Llama 3's CP)
                kv = sum(g.edges[p, name]["bytes"] for p in preds[1:]) * scale
                comm_s += passes * comm.time_s("all_gather", t, 1, kv) + comm.time_s("reduce_scatter", t, 1, kv)
        else:  # norm, elementwise, embedding lookup: memory-bound, read inputs and write the output
            fwd = memory_bound_time_s(cluster, (in_bytes + out_bytes) / k)
            bwd = 2 * fwd
        params = a["params"] / wk
        if params == 0:
            sync = 0.0
        elif sname in ("batch-split", "sequence-split"):  # replicas on both axes: reduce over all d*t ranks
            sync = comm.time_s("all_reduce", d * t, 1, params * GRAD_BYTES)
        else:  # replicated or sharded over axis 1: reduce the (shard of the) weights over axis 0
            sync = comm.time_s("all_reduce", d, t, params * GRAD_BYTES)
        stored = out_bytes / (t if lout in _SHARDED else 1) * copies
        out.append(Strategy(sname, lin, lout, lgrad, fwd * passes + bwd, comm_s, sync,
                            zero_model_state_bytes(params, d, zero_stage) + stored))
    return sorted(out, key=lambda s: STRATEGY_ORDER.index(s.name))


def build_problem(graph: nx.DiGraph, spec: ModelSpec, cluster: Cluster, profile: Profile | None, *, dp: int, tp: int,
                  microbatches: int, memory_budget_bytes: float, zero_stage: int = 0, recompute: str = "none",
                  flash_attention: bool = True, activation_copies: float = 1.0, cp: int = 1) -> IntraOpProblem:
    """The ILP of `graph` (planner.build.graph.trace_op_graph of one layer, one micro-batch) on a dp x tp mesh.

    `activation_copies`: micro-batches whose activations a device holds at once (the caller takes it
    from planner.cost.memory's in-flight count); `cp`: context-parallel degree (1/cp of the tokens here).
    """
    require(dp >= 1 and tp >= 1 and microbatches >= 1, f"mesh {dp}x{tp} and {microbatches} micro-batches must be >= 1")
    comm = CommModel(cluster, profile)
    passes = 2 if recompute == "full" else 1
    cyclic_kind = graph.graph["kind"] in ("block", "moe_block")
    names = list(graph.nodes)
    nodes, conversions, edges = [], [], []
    if cyclic_kind:  # the layer input, laid out as the previous identical block's output
        in_bytes = graph.graph["input_bytes"] / cp
        nodes.append(OpNode("input", "input", in_bytes, tuple(
            Strategy(n, lay, lay, lay, 0.0, 0.0, 0.0, 0.0) for n, lay in
            (("replicate", "R"), ("column-split", "C"), ("sequence-split", "S"), ("batch-split", "B"))
            if lay == "R" or tp > 1)))
        conversions.append(conversion_costs(comm, tp, in_bytes))
    offset = len(nodes)
    for name in names:
        strategies = _strategies(graph, name, spec, cluster, comm, dp, tp, zero_stage, passes, flash_attention,
                                 activation_copies, cp)
        out_bytes = graph.nodes[name]["out_bytes"] / cp
        nodes.append(OpNode(name, graph.nodes[name]["op"], out_bytes, tuple(strategies)))
        conversions.append(conversion_costs(comm, tp, out_bytes))
    for u, v in graph.edges:
        edges.append((offset + names.index(u), offset + names.index(v)))
    cyclic = None
    if cyclic_kind:
        edges += [(0, offset + names.index(n)) for n in graph.graph["input_nodes"]]
        cyclic = (0, offset + names.index(graph.graph["output_node"]))
    return IntraOpProblem(kind=graph.graph["kind"], dp=dp, tp=tp, nodes=tuple(nodes), edges=tuple(sorted(edges)),
                          conversions=tuple(conversions), cyclic=cyclic, microbatches=microbatches,
                          forward_passes=passes, memory_budget_bytes=float(memory_budget_bytes))


# ---- evaluating an assignment (the same terms as the ILP objective) -------------------------------


def _grad_layout(layout: str) -> str:
    return "R" if layout == "P" else layout


def evaluate(problem: IntraOpProblem, assignment: dict[str, str]) -> IntraOpCost:
    """Cost terms of a full assignment {operator: strategy name}."""
    chosen = []
    for node in problem.nodes:
        match = [s for s in node.strategies if s.name == assignment[node.name]]
        require(len(match) == 1, f"operator '{node.name}' has no strategy '{assignment[node.name]}' on this mesh")
        chosen.append(match[0])
    compute = sum(s.compute_s for s in chosen)
    comm = sum(s.comm_s for s in chosen)
    for u, node in enumerate(problem.nodes):
        cons = [v for a, v in problem.edges if a == u]
        table = {(a, b): c for a, b, c in problem.conversions[u]}
        for lay in sorted({chosen[v].inputs for v in cons}):  # forward: materialise each distinct layout once
            comm += problem.forward_passes * table.get((chosen[u].output, lay), 0.0)
        need = _grad_layout(chosen[u].output)
        for lay in sorted({chosen[v].grad_in for v in cons}):  # backward: each distinct arriving layout once
            comm += table.get((lay, need), 0.0)
    sync = sum(s.grad_sync_s for s in chosen)
    return IntraOpCost(compute_s=compute, comm_s=comm, grad_sync_s=sync, memory_bytes=sum(s.memory_bytes for s in chosen),
                       step_s=problem.microbatches * (compute + comm) + sync)


def megatron_assignment(problem: IntraOpProblem, sequence_parallel: bool = False) -> dict[str, str]:
    """Megatron-LM's sharding (Shoeybi et al. 2019 sec. 3; Korthikanti et al. 2022 sec. 4.2.2 with SP):
    matmuls reading a column-split tensor are row-split, the others column-split; attention by heads;
    elementwise ops between them column-split; norms and residual adds replicated (sequence-split with SP)."""
    out, split = {}, set()
    rest = "sequence-split" if sequence_parallel and problem.tp > 1 else "replicate"
    for i, node in enumerate(problem.nodes):
        names = {s.name for s in node.strategies}
        preds = [u for u, v in problem.edges if v == i]
        from_split = bool(preds) and all(u in split for u in preds)
        if node.op == "matmul":
            pick = "row-split" if any(u in split for u in preds) else "column-split"
        elif node.op in ("attention", "experts") or (node.op == "elementwise" and from_split):
            pick = "column-split"
        elif node.op == "embedding":
            pick = "row-split"
        else:
            pick = rest
        pick = pick if pick in names else "replicate"
        out[node.name] = pick
        if pick == "column-split" and node.op != "experts":
            split.add(i)
    return out


# ---- the 0-1 program ------------------------------------------------------------------------------


def formulate(problem: IntraOpProblem) -> tuple[Milp, list[tuple[int, int]], int]:
    """(Milp, x variable of each (node, strategy index), objective scale K); labelled constraints."""
    names, objective, cons = [], [], []
    m, passes = problem.microbatches, problem.forward_passes

    def var(label: str) -> int:
        names.append(label)
        return len(names) - 1

    def ns(seconds: float) -> int:
        return int(round(seconds * NS_PER_S))

    penalty = [[STRATEGY_ORDER.index(s.name) for s in n.strategies] for n in problem.nodes]
    scale = sum(max(p) for p in penalty) + 1  # lexicographic: cost first, then the preference order
    x = [[var(f"x[{n.name},{s.name}]") for s in n.strategies] for n in problem.nodes]
    xmap = [(i, j) for i, row in enumerate(x) for j, _ in enumerate(row)]
    for i, node in enumerate(problem.nodes):
        cons.append((f"one_strategy[{node.name}]", tuple((x[i][j], 1) for j in range(len(node.strategies))), "==", 1))
        for j, s in enumerate(node.strategies):
            objective.append((x[i][j], scale * ns(m * (s.compute_s + s.comm_s) + s.grad_sync_s) + penalty[i][j]))
    # memory in whole KiB (each term rounded up, the budget down: never looser than in bytes); byte-sized
    # coefficients next to nanosecond costs make CBC's cuts numerically unsafe (it then misses the optimum)
    budget = int(min(problem.memory_budget_bytes, 2.0**62) // KIB)
    cons.append(("memory", tuple((x[i][j], -int(-s.memory_bytes // KIB)) for i, n in enumerate(problem.nodes)
                                 for j, s in enumerate(n.strategies)), "<=", budget))
    if problem.cyclic:
        a, b = problem.cyclic
        for lay in LAYOUTS:
            terms = [(x[a][j], 1) for j, s in enumerate(problem.nodes[a].strategies) if s.output == lay]
            terms += [(x[b][j], -1) for j, s in enumerate(problem.nodes[b].strategies) if s.output == lay]
            if terms:
                cons.append((f"cyclic[{lay}]", tuple(terms), "==", 0))
    # Edge pairs (Alpa's e_uv, over interface classes): e[u,v,a,b] = 1 iff u's output layout is a and v's
    # (input layout, input-gradient layout) is b; its marginals are the x of u and of v, which keeps the
    # LP relaxation tight. A conversion of u's output is paid once however many consumers need it:
    # conv[u,a,L] >= sum_{b needing L} e[u,v,a,b] for every consumer v (forward, and backward alike).
    for u, node in enumerate(problem.nodes):
        consumers = [v for a, v in problem.edges if a == u]
        table = {(a, b): c for a, b, c in problem.conversions[u]}
        outs = sorted({s.output for s in node.strategies})
        fwd_pay = {(a, lay): var(f"fwd_convert[{node.name},{a}->{lay}]") for a in outs for lay in LAYOUTS
                   if table.get((a, lay), 0) > 0 and any(s.inputs == lay for v in consumers for s in problem.nodes[v].strategies)}
        bwd_pay = {(a, lay): var(f"bwd_convert[{node.name},{lay}->{_grad_layout(a)}]") for a in outs for lay in LAYOUTS
                   if table.get((lay, _grad_layout(a)), 0) > 0
                   and any(s.grad_in == lay for v in consumers for s in problem.nodes[v].strategies)}
        for (a, lay), z in fwd_pay.items():
            objective.append((z, scale * ns(m * passes * table[(a, lay)])))
        for (a, lay), z in bwd_pay.items():
            objective.append((z, scale * ns(m * table[(lay, _grad_layout(a))])))
        for v in consumers:
            cname = problem.nodes[v].name
            ins = sorted({(s.inputs, s.grad_in) for s in problem.nodes[v].strategies})
            e = {(a, b): var(f"edge[{node.name}->{cname},{a},{b[0]}{b[1]}]") for a in outs for b in ins}
            for a in outs:  # marginal on u
                cons.append((f"edge_out[{node.name}->{cname},{a}]", tuple((e[a, b], 1) for b in ins)
                             + tuple((x[u][j], -1) for j, s in enumerate(node.strategies) if s.output == a), "==", 0))
            for b in ins:  # marginal on v
                cons.append((f"edge_in[{node.name}->{cname},{b[0]}{b[1]}]", tuple((e[a, b], 1) for a in outs)
                             + tuple((x[v][j], -1) for j, s in enumerate(problem.nodes[v].strategies)
                                     if (s.inputs, s.grad_in) == b), "==", 0))
            for (a, lay), z in fwd_pay.items():
                terms = tuple((e[a, b], -1) for b in ins if b[0] == lay)
                if terms:
                    cons.append((f"fwd_pays[{node.name}->{cname},{a}->{lay}]", ((z, 1), *terms), ">=", 0))
            for (a, lay), z in bwd_pay.items():
                terms = tuple((e[a, b], -1) for b in ins if b[1] == lay)
                if terms:
                    cons.append((f"bwd_pays[{node.name}->{cname},{lay}->{_grad_layout(a)}]", ((z, 1), *terms), ">=", 0))
    milp = Milp(names=tuple(names), objective=tuple(objective), constraints=tuple(cons))
    return milp, xmap, scale


def solve_intra_op(problem: IntraOpProblem, backend: str = "ortools", time_limit_s: float | None = None) -> IntraOpSolution | None:
    """The optimal assignment, or None when no assignment fits the memory budget."""
    require(backend in BACKENDS, f"--ilp-backend '{backend}' is unknown; valid: {', '.join(BACKENDS)}")
    milp, xmap, _ = formulate(problem)
    if backend == "ortools":
        from solvers.ilp_ortools import solve_milp
    else:
        from solvers.ilp_pulp import solve_milp
    result = solve_milp(milp, time_limit_s)
    if result is None:
        return None
    values, objective = result
    assignment = {}
    for var_index, (i, j) in enumerate(xmap):
        if values[var_index]:
            assignment[problem.nodes[i].name] = problem.nodes[i].strategies[j].name
    return IntraOpSolution(kind=problem.kind, dp=problem.dp, tp=problem.tp,
                           assignment=tuple((n.name, assignment[n.name]) for n in problem.nodes),
                           cost=evaluate(problem, assignment), backend=backend, objective=objective)
