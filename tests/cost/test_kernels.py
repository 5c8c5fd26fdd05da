"""planner/cost/kernels.py: the kernel inventory of a layer against the modules the runners execute (the meta-device
trace of planner/build/modeling.py), its pricing against closed forms over a synthetic database, and the cluster file
that names a database (load, round trip, refusals)."""

import math
from collections import Counter
from dataclasses import replace

import pytest

from planner.build.graph import trace_op_graph
from planner.core.cluster import cluster_from_dict, load_cluster
from planner.core.errors import DistplanError
from planner.core.fileio import dump_yaml
from planner.core.job import ParallelConfig
from planner.core.kerneldb import WORK, kernel_db_from_dict
from planner.core.model import load_model
from planner.cost import kernels as K
from planner.cost.predict import predict
from tests.core.test_kerneldb import synthetic

MODELS = ("gpt2-xl", "llama-3-8b", "mixtral-8x7b")


def cfg_for(tp=1, mb=2, seq=1024, flash=True, sp=False, ep=1, cp=1):
    return ParallelConfig(dp=1, tp=tp, pp=1, cp=cp, ep=ep, vpp=1, sequence_parallel=sp, zero_stage=0,
                          offload_optimizer=False, micro_batch_size=mb, global_batch_size=mb, seq_len=seq,
                          schedule="1f1b", recompute="none", layer_split=None, flash_attention=flash,
                          overlap_grad_reduce=True)


@pytest.mark.parametrize("name", ("gpt2-xl", "llama-3-8b"))
def test_block_gemms_are_the_traced_linears(name):
    """Every nn.Linear the block runs is one forward GEMM of its (tokens, out, in); backward is dgrad and wgrad of
    the same shapes; and the attention core's work is the traced core's (causal: half of it)."""
    spec, c = load_model(name), cfg_for(mb=2, seq=256)
    g = trace_op_graph(spec, "block", 2, 256)
    traced = Counter((2 * 256, *d["weight_shape"]) for _, d in g.nodes(data=True) if d["op"] == "matmul")
    fwd = K.block_kernels(spec, c, "fwd")
    mine = Counter()
    for kn in fwd:
        if kn.kind == "gemm":
            s = dict(kn.shape)
            mine[(s["m"], s["n"], s["k"])] += kn.calls
    assert mine == traced
    bwd = K.block_kernels(spec, c, "bwd")
    for layout in ("dgrad", "wgrad"):
        got = Counter()
        for kn in bwd:
            if kn.kind == "gemm" and kn.key == layout:
                s = dict(kn.shape)
                got[(s["m"], s["n"], s["k"])] += kn.calls
        assert got == traced
    core = next(d for n, d in g.nodes(data=True) if d["op"] == "attention")
    att = next(kn for kn in fwd if kn.kind == "attention")
    assert WORK["attention.fwd"](dict(att.shape), 2) == core["flops_fwd"] / 2


@pytest.mark.parametrize("name", ("gpt2-xl", "llama-3.2-1b"))
def test_backward_residual_and_gradient_sums_are_the_traced_adds(name):
    """The block's backward as torch runs it (modeling.Block's forward and backward under a dispatch recorder):
    every elementwise add of a [tokens, hidden] gradient (the residual's, and the sums autograd makes where q, k,
    v, or gate and up, read one input) is one add kernel of the inventory."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from planner.build.modeling import Block

    spec, tokens = load_model(name), 16

    class Adds(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if (func is torch.ops.aten.add.Tensor and tuple(out.shape) == (1, tokens, spec.hidden_size)
                    and out.dtype == torch.bfloat16):  # RMSNorm's own float32 add is part of rms_norm.bwd
                Adds.count += 1
            return out

    with torch.device("meta"):
        block = Block(spec).to(torch.bfloat16)
    x = torch.empty(1, tokens, spec.hidden_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y = block(x)
    with Adds():
        y.backward(torch.empty_like(y))
    mine = sum(kn.calls for kn in K.block_kernels(spec, cfg_for(mb=1, seq=tokens), "bwd")
               if kn.kind == "memory" and kn.key == "add.fwd")
    assert Adds.count >= 3 and mine == Adds.count


@pytest.mark.parametrize("cp", (1, 2, 8))
def test_ring_attention_does_the_causal_work_of_the_local_queries(cp):
    """Context parallelism splits the queries, not the work per query: each GPU's attention FLOPs are the causal
    total / cp (the local queries against every earlier key), as ModelSpec counts them (SC'21's attn_core,
    halved for the causal mask), not the local chunk's own (s / cp)^2."""
    spec = load_model("llama-3-8b")
    c = cfg_for(mb=1, seq=8192, cp=cp)
    att = [kn for kn in K.block_kernels(spec, c, "fwd") if kn.kind == "attention"]
    work = sum(kn.calls * WORK["attention.fwd"](dict(kn.shape), 2) for kn in att)
    tokens = c.micro_batch_size * c.seq_len / cp
    assert work == pytest.approx(tokens * spec.block_matmul_flops_per_token(c.seq_len)["attn_core"] / 2, rel=1e-12)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tp", (1, 2, 8))
def test_gemm_flops_match_the_model_spec_per_tp_shard(name, tp):
    """Forward GEMM FLOPs of a block shard = ModelSpec's matmul FLOPs per token x tokens / tp (SC'21's count)."""
    spec = load_model(name)
    c = cfg_for(tp=tp, ep=1)
    mm = spec.block_matmul_flops_per_token(c.seq_len)
    tokens = c.micro_batch_size * c.seq_len
    flops = sum(kn.calls * 2 * math.prod(v for k, v in kn.shape) for kn in K.block_kernels(spec, c, "fwd")
                if kn.kind == "gemm")
    expect = tokens * (mm["qkv"] + mm["attn_out"] + mm["mlp"] + mm.get("router", 0.0) * tp) / tp
    assert flops == pytest.approx(expect, rel=1e-9)


def flat_db(gemm_rate=4e14, attn_rate=2e14, bw=2e12, launch=5e-6):
    """An H100 cluster with a database whose every GEMM runs at `gemm_rate` FLOP/s, attention at `attn_rate`, memory-bound at `bw` B/s,
    over grids wide enough that every query is inside: prices then have closed forms."""
    d = synthetic()
    ax = {"m": [1, 2**20], "n": [1, 2**20], "k": [1, 2**20]}
    d["gemm"] = {"axes": ax, "seconds": {lay: [[[2 * m * n * k / gemm_rate for k in ax["k"]] for n in ax["n"]]
                                               for m in ax["m"]] for lay in ("fwd", "dgrad", "wgrad")}}
    aa = {"seq": [64, 2**18], "heads": [1, 2**12], "head_dim": [32, 256], "gqa": [1, 8]}
    d["attention"] = {"axes": aa, "seconds": {ph: [[[[f * 2 * s * s * hd * h / attn_rate for _ in aa["gqa"]]
                                                     for hd in aa["head_dim"]] for h in aa["heads"]] for s in aa["seq"]]
                                              for ph, f in (("fwd", 1.0), ("bwd", 2.5))}}
    rows, widths = [1, 2**24], [1, 2**20]
    kernels = {}
    for key in WORK:
        if key in ("gemm", "attention.fwd", "attention.bwd"):
            continue
        fixed = {"embedding.fwd": {"hidden": 4096}, "embedding.bwd": {"hidden": 4096}}.get(key, {})
        fixed = {"gqa_expand.fwd": {"groups": 4}, "gqa_expand.bwd": {"groups": 4}}.get(key, fixed)
        kernels[key] = {"axes": {"width": widths, "rows": rows}, **({"fixed": fixed} if fixed else {}),
                        "seconds": [[WORK[key]({"rows": r, "width": w, **fixed}, 2) / bw for r in rows] for w in widths]}
    d["memory_bound"] = {"kernels": kernels}
    d["launch"]["eager_op_s"] = launch
    return replace(load_cluster("dgx-h100-80gb"), kernel_database="flat", kernels=kernel_db_from_dict(d, "flat"))


@pytest.mark.parametrize("name", MODELS)
def test_prices_are_work_over_rates(name):
    spec, db = load_model(name), flat_db()
    c = cfg_for(tp=2, mb=4, seq=2048)
    for ph in ("fwd", "bwd"):
        kns = K.block_kernels(spec, c, ph)
        got = K.price(db, kns)
        gemm = sum(kn.calls * 2 * math.prod(v for k, v in kn.shape) for kn in kns if kn.kind == "gemm") / 4e14
        att = sum(kn.calls * WORK[f"attention.{ph}"](dict(kn.shape), 2) for kn in kns if kn.kind == "attention") / 2e14
        mem = sum(kn.calls * WORK[kn.key](dict(kn.shape), 2) for kn in kns if kn.kind == "memory") / 2e12
        assert got.notes == ()
        assert got.gpu_s == pytest.approx(gemm + att + mem, rel=1e-9)
        assert got.launches == sum(kn.calls for kn in kns)
    # the backward's GEMMs are twice the forward's
    gf = sum(kn.calls * math.prod(v for k, v in kn.shape) for kn in K.block_kernels(spec, c, "fwd") if kn.kind == "gemm")
    gb = sum(kn.calls * math.prod(v for k, v in kn.shape) for kn in K.block_kernels(spec, c, "bwd") if kn.kind == "gemm")
    assert gb == 2 * gf


def test_a_small_layer_runs_at_the_hosts_pace():
    spec = load_model("gpt2")
    c = cfg_for(mb=1, seq=64)
    fast = flat_db(gemm_rate=1e18, attn_rate=1e18, bw=1e16, launch=1e-4)
    fwd, _ = K.layer_times(fast, K.block_kernels, spec, c)
    assert fwd == pytest.approx(sum(kn.calls for kn in K.block_kernels(spec, c, "fwd")) * 1e-4)


def test_outside_the_grid_is_named_in_the_prediction(tmp_path):
    """The synthetic database's narrow grids: llama-3-8b's shapes fall outside, and the plan's sources say so."""
    db_file = tmp_path / "synthetic.yaml"
    db_file.write_text(dump_yaml(synthetic()))
    data = load_cluster("dgx-h100-80gb").to_dict()
    data["kernel_database"] = str(db_file)
    cluster = cluster_from_dict(data, "test cluster")
    spec = load_model("llama-3-8b")
    pred = predict(spec, cluster, replace(cfg_for(mb=1, seq=4096), global_batch_size=8))
    sources = dict(pred.sources)
    assert sources["compute.block.tp1"].startswith("kernel database Synthetic GPU")
    assert "outside the measured grid" in sources["kernels.extrapolated"]
    # a kernel the database lacks is priced the preset's way and said so
    assert "attention fwd" in sources["kernels.extrapolated"] or "not in the database" in sources["kernels.extrapolated"]
    # the same cluster without the database prices the preset's way, and says "preset"
    bare = cluster_from_dict({k: v for k, v in data.items() if k != "kernel_database"}, "test cluster, no database")
    plain = predict(spec, bare, replace(cfg_for(mb=1, seq=4096), global_batch_size=8))
    assert dict(plain.sources)["compute.block.tp1"] == "preset" and "kernels.extrapolated" not in dict(plain.sources)
    assert plain.step_time_s != pred.step_time_s


def test_cluster_file_names_its_database_and_round_trips(tmp_path):
    db_file = tmp_path / "g.yaml"
    db_file.write_text(dump_yaml(synthetic()))
    data = load_cluster("dgx-h100-80gb").to_dict()
    data["kernel_database"] = str(db_file)
    cluster = cluster_from_dict(data, "c")
    assert cluster.kernels is not None and cluster.kernels.gpu_name == "Synthetic GPU"
    again = cluster_from_dict(cluster.to_dict(), "again")
    assert again == cluster and again.kernels.gpu_name == "Synthetic GPU"
    data["kernel_database"] = str(tmp_path / "missing.yaml")
    with pytest.raises(DistplanError, match="kernel_database .*missing.yaml"):
        cluster_from_dict(data, "c")


def test_a_kernel_the_database_lacks_is_priced_by_the_preset_and_said_so():
    from planner.cost.terms import memory_bound_time_s
    cluster = replace(load_cluster("dgx-h100-80gb"), kernel_database="synthetic",
                      kernels=kernel_db_from_dict(synthetic(), "synthetic"))
    kn = K.memory("gelu", "fwd", 4096, 6400)
    got = K.price(cluster, kn)
    assert got.gpu_s == memory_bound_time_s(cluster, WORK["gelu.fwd"]({"rows": 4096, "width": 6400}, 2))
    assert len(got.notes) == 1 and "not in the database" in got.notes[0] and got.notes[0].endswith("preset")
    inside = K.price(cluster, K.memory("rms_norm", "fwd", 256, 4096))
    assert inside.notes == () and inside.gpu_s == cluster.kernels.memory_bound_time_s("rms_norm.fwd", rows=256,
                                                                                        width=4096)[0]


def test_the_optimizer_step_takes_the_databases_measured_rate():
    """Without a profile the AdamW step is the database's measured seconds per parameter (as a profile's rate would
    be), and the sources say so; the preset's bytes/bandwidth otherwise."""
    from planner.cost.predict import measured_adamw_s_per_param
    spec = load_model("gpt2-xl")
    cfg = replace(cfg_for(mb=4, seq=1024), global_batch_size=8)
    slow = flat_db()
    slow = replace(slow, kernels=replace(slow.kernels, adamw=1e-9))
    plain = replace(slow, kernel_database="", kernels=None)
    assert measured_adamw_s_per_param(slow, None) == 1e-9 and measured_adamw_s_per_param(plain, None) == 0.0
    with_db, without = predict(spec, slow, cfg), predict(spec, plain, cfg)
    assert dict(with_db.sources)["optimizer"].startswith("kernel database")
    assert "optimizer" not in dict(without.sources)
    opt_with, opt_without = dict(with_db.breakdown)["optimizer"], dict(without.breakdown)["optimizer"]
    step = spec.total_params() * 1e-9  # one rank holds every parameter (dp = 1)
    assert step <= opt_with < 1.2 * step and opt_without < 0.2 * step


def test_an_unaligned_width_is_named_not_silently_priced():
    """GPT-2's 50,257-word head: the database holds aligned widths only, so its price says it was extrapolated."""
    cluster = flat_db()
    spec = load_model("gpt2-xl")
    notes = K.price(cluster, K.head_kernels(spec, cfg_for(mb=2, seq=1024), "fwd")).notes
    assert any("n 50257 not a multiple of 8: priced at the aligned grid's rate" in n for n in notes)
    llama = K.price(cluster, K.head_kernels(load_model("llama-3-8b"), cfg_for(mb=2, seq=1024), "fwd")).notes
    assert llama == ()
