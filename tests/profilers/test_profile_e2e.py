"""`distplan profile` end to end on the CPU (gloo between local processes): the whole path CI can run.

Layer times on the CPU are the measuring thread's CPU time (profilers.timing.Clock), so a busy CI
machine barely moves them; still, the fits are held to a loose bound here (CPU_FIT_TOLERANCE);
tests/profilers/test_fit.py holds the fitting itself to tight bounds on synthetic data, and the GPU
profiles under benchmarks/results/ record each fit's largest error on real hardware.
"""

import pytest
import yaml

from conftest import parse_json
from planner.core.cluster import load_cluster
from planner.cost.profiled import cluster_for_profile
from planner.core.profile import save_profile
from planner.cost.profiled import load_profile
from profilers import comm
from profilers.fit import collective_time_s
from profilers.run import ProfileRequest, run_profile
from profilers.sharding import STACK, fit_sharding

pytestmark = pytest.mark.slow
CPU_FIT_TOLERANCE = 0.25  # every raw block time within 25% of its fit (about 5% on an idle CPU)

# small, but with layers of milliseconds: below that, CPU timings are per-call overhead and jitter
TINY = {"family": "llama", "num_layers": 2, "hidden_size": 256, "ffn_hidden_size": 1024, "num_heads": 4,
        "num_kv_heads": 2, "vocab_size": 8192, "max_seq_len": 128}
SEQ = 128


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory):
    """The tiny model profiled once for this module, through `distplan profile` as a user runs it (stderr is not a
    terminal here, so progress comes as one timestamped line per step): (CLI result, model file, profile file)."""
    from typer.testing import CliRunner

    from planner.cli import app

    folder = tmp_path_factory.mktemp("model")
    model, out = folder / "tiny.yaml", folder / "profile.yaml"
    model.write_text(yaml.safe_dump(TINY))
    r = CliRunner().invoke(app, ["profile", "--model", str(model), "--seq-len", str(SEQ), "--device", "cpu",
                                 "--micro-batches", "1,2,4", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return r, model, out


@pytest.fixture(scope="module")
def tiny_profile(tiny_cli):
    """(the profile as written, its progress ticks (label, done, total) read back from the progress lines)."""
    r, _, out = tiny_cli
    ticks = []
    for line in r.stderr.splitlines():
        if line.startswith("[") and " s] " in line:
            count, label = line.split("] ", 1)[1].split(" ", 1)
            done, total = count.split("/")
            ticks.append((label, int(done), int(total)))
    return load_profile(out), ticks


def test_cpu_profile_has_every_part(tiny_profile):
    prof, ticks = tiny_profile
    assert prof.device == "cpu" and prof.device_count == 2 and prof.dtype == "fp32" and prof.seq_len == SEQ
    kinds = ("embedding", "block", "head", "attention_unfused")
    assert {(c.kind, c.tp) for c in prof.compute} == {(k, t) for k in kinds for t in (1, 2)}
    assert prof.compute_fit("block", 1).recompute is not None
    measured = {(c.op, c.group_size) for c in prof.collectives}
    unmeasured = prof.facts["unmeasured_collectives"]
    for op in comm.OPS:
        assert (op, 2) in measured or f"{op}.n2" in unmeasured  # gloo may lack an op: then it says so
    assert prof.overlap_slowdown is not None and prof.overlap_slowdown >= 0
    assert prof.matmul_tflops > 0 and prof.hbm_bandwidth_gb_s > 0 and len(prof.matmul_tflops_by_gflop) == 4
    assert prof.facts["wall_time_s"] > 0 and "not measured" in prof.facts["inter_node"]
    assert prof.facts["measured_on"] == "cpu" and prof.facts["backend"] == "gloo"
    # the progress callback saw every step, ending at the total
    assert ticks[-1][1] == ticks[-1][2] and len(ticks) >= ticks[-1][2]


def test_fits_reproduce_the_raw_measurements(tiny_profile):
    """Blocks (most of a step) within CPU_FIT_TOLERANCE of every raw point; every fit positive.

    The embedding and the head of this small model are dominated by fresh allocations of the
    logits and of the table gradient on a CPU (page faults): their points scatter by tens of
    percent between identical runs, so they are only held to within a factor of two."""
    prof, _ = tiny_profile
    for r in prof.raw["compute"]:
        fit = prof.compute_fit(r["kind"], r["tp"])
        bound = CPU_FIT_TOLERANCE if r["kind"] == "block" else 1.0
        for p in r["points"]:
            for phase in ("fwd", "bwd"):
                got, want = getattr(fit, phase)(p["tokens"]), p[f"{phase}_s"]
                assert got > 0 and abs(got - want) / want <= bound, (r["kind"], r["tp"], phase, p)
    # collectives between processes wait on each other in wall-clock time, which a loaded CI machine
    # stretches at random: here the recorded fit error must be the one the points give
    recorded = prof.raw["fit_max_relative_error"]
    worst = {}
    for p in prof.raw["communication"]["points"]:
        fit = prof.collective_fit(p["op"], p["group_size"])
        key = f"{p['op']}.n{p['group_size']}"
        worst[key] = max(worst.get(key, 0.0), abs(collective_time_s(fit, p["bytes"]) - p["time_s"]) / p["time_s"])
    assert worst == pytest.approx(recorded["collectives"])
    assert set(recorded["compute"]) == {f"{c.kind}.tp{c.tp}" for c in prof.compute}


def test_profile_file_round_trips(tiny_profile, tmp_path):
    from planner.core.profile import save_profile

    prof, _ = tiny_profile
    save_profile(prof, tmp_path / "p.yaml")
    again = load_profile(tmp_path / "p.yaml")
    assert again == prof and again.raw["compute"] == prof.raw["compute"]
    cluster = cluster_for_profile(again, load_cluster("dgx-h100-80gb"))  # a CPU profile is its own machine
    assert cluster.name == "measured-cpu" and cluster.gpus_per_node == 2


def test_two_simulated_nodes_measure_the_inter_node_tier():
    """4 gloo processes as 2 nodes x 2: groups stay in node 0, and p2p across nodes is measured."""
    settings = comm.CommSettings(sizes_bytes=(64 * comm.KIB, comm.MIB), group_sizes=(2,), ops=("all_reduce",),
                                 warmup=1, trials=1, max_iters=2, overlap=False, local_size=2)
    raw = comm.measure_spawned(4, False, settings)
    assert {p["group_size"] for p in raw["points"]} == {2}
    inter = raw["inter_node"]
    assert inter["nodes"] == 2 and len(inter["p2p"]) == 2 and len(inter["all_reduce"]) == 2
    from profilers.run import fit_comm

    _, link, _ = fit_comm(raw)
    assert link is not None and link.bus_bandwidth_gb_s > 0


def _hang() -> None:  # a rank that never exits (as after the FSDP2 x TP points on 8x H200, session 9)
    import time

    while True:
        time.sleep(1)


def test_reap_stops_ranks_that_do_not_exit_within_the_grace():
    """The parent waits EXIT_GRACE_S in all, not 60 s per rank (4 x 60 s held a 4xH200 profile past its limit)."""
    import time

    import torch

    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hang, daemon=True) for _ in range(4)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    comm.reap(procs, grace_s=1.0)
    assert time.monotonic() - t0 < 1.0 + 4 * 1.0  # the grace, then SIGTERM takes each at once
    assert all(not p.is_alive() and p.exitcode not in (None, 0) for p in procs)


def test_spawned_ranks_exit_on_their_own_once_rank_0_reported(monkeypatch):
    """The workers flush rank 0's result and exit without tearing the groups down: none is left to stop."""
    import time

    monkeypatch.setattr(comm, "EXIT_GRACE_S", 300.0)  # a rank hung at exit would hold the parent this long
    settings = comm.CommSettings(sizes_bytes=(64 * comm.KIB,), group_sizes=(2,), ops=("all_reduce",),
                                 warmup=1, trials=1, max_iters=2, overlap=False)
    t0 = time.monotonic()
    raw = comm.measure_spawned(2, False, settings)
    assert [p["op"] for p in raw["points"]] == ["all_reduce"] and raw["points"][0]["time_s"] > 0
    assert time.monotonic() - t0 < 120.0


def test_cli_profile_then_estimate_and_solve(cli, tiny_cli, tiny_profile):
    """The issue's CI flow: profile a model on the CPU (the module's profile, made with `distplan profile`), then
    plan 2 'GPUs' of this machine with it."""
    r, model, path = tiny_cli
    assert "profile of tiny" in r.stdout and path.exists()
    _, ticks = tiny_profile
    assert len(ticks) >= 10 and ticks[-1][1] == ticks[-1][2]  # one progress line per step, the last one complete
    prof = load_profile(path)
    assert prof.device == "cpu" and prof.model == "tiny" and prof.compute_fit("block", 2) is not None
    from planner.core.model import load_model
    from planner.core.model import model_shape

    assert prof.model_shape == model_shape(load_model(str(model)))  # what it measured, written by the profiler
    assert yaml.safe_load(path.read_text())["model_shape"]["hidden_size"] == TINY["hidden_size"]
    est = parse_json(cli("estimate", "--model", model, "--gpus", 2, "--seq-len", SEQ, "--profile", path,
                         "--format", "json"))
    assert est["cluster"] == "measured-cpu" and est["sources"]["compute.block.tp1"] == "profile"
    assert est["sources"]["comm.all_reduce.n2"] == "profile"
    solved = cli("solve", "--model", model, "--gpus", 2, "--profile", path, "-o", path.parent / "plan.yaml")
    assert solved.exit_code == 0, solved.output
    # at another sequence length the profile's fits do not apply: refused, naming both sequence lengths
    other = cli("solve", "--model", model, "--gpus", 2, "--seq-len", SEQ // 2, "--profile", path,
                "-o", path.parent / "other.yaml")
    assert other.exit_code == 2 and f"profile it at --seq-len {SEQ // 2}" in " ".join(other.stderr.split())


def test_cpu_profile_measures_the_fsdp2_per_block_overhead(tiny_profile):
    """profilers/sharding.py over gloo: one block plain vs fully_shard, both reshard modes, raw points kept."""
    prof, _ = tiny_profile
    assert {(s.impl, s.group_size, s.reshard_after_forward) for s in prof.sharding} == {
        ("fsdp2", 2, True), ("fsdp2", 2, False), ("ddp", 2, False),  # DDP (ZeRO-0) on the same stacks
        ("tp", 2, False), ("tp-sp", 2, False)}  # and the torch engine's DTensor TP (tests/profilers/test_pipeline_runtime.py)
    for reshard in (True, False):
        for tokens in (SEQ, 4 * SEQ):
            assert prof.sharding_overhead_s(2, reshard, tokens) >= 0
    assert prof.sharding_overhead_s(2, False, SEQ, "ddp") >= 0
    pts = [p for p in prof.raw["communication"]["sharding"] if p.get("impl") not in ("tp", "tp-sp")]
    # both ends of the profiled range (1, 2, 4), FSDP2's two modes (each synchronising and accumulating) and DDP,
    # stacks of 1 and STACK blocks
    assert len(pts) == 20 and {p["micro_batch"] for p in pts} == {1, 4} and {p["blocks"] for p in pts} == {1, STACK}
    assert sum(p.get("impl") == "ddp" for p in pts) == 4
    assert sum(p.get("sync") is False for p in pts) == 8
    assert all(s.accumulate is not None for s in prof.sharding if s.impl == "fsdp2")
    assert all(p["plain_s"] > 0 and p["wrapped_s"] > 0 and p["overhead_s"] == p["wrapped_s"] - p["plain_s"] for p in pts)
    # split into a per-block line and an edge line (exactness: test_sharding_fit_splits_per_block_and_edge_exactly)
    assert all(s.edge is not None and prof.sharding_edge_s(2, s.reshard_after_forward, SEQ) >= 0 for s in prof.sharding)


def test_measured_optimizer_rate_sets_the_optimizer_term(tiny_profile):
    """The profile's AdamW step rate (profilers/facts.optimizer_s_per_param) replaces the preset's
    bytes-over-bandwidth guess: the optimizer term is exactly parameters x rate, and sources say so."""
    from dataclasses import replace

    from planner.core.job import ParallelConfig
    from planner.core.model import spec_from_dict
    from planner.cost.predict import predict

    prof, _ = tiny_profile
    assert 1e-12 < prof.optimizer_s_per_param < 1e-6  # CPU: a few ns per parameter
    model = spec_from_dict(dict(TINY), "tiny", "test")
    cfg = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=1, global_batch_size=1, seq_len=SEQ)
    cluster = cluster_for_profile(prof, None)
    pred = predict(model, cluster, cfg, prof)
    assert dict(pred.breakdown)["optimizer"] == pytest.approx(model.total_params() * prof.optimizer_s_per_param, rel=1e-9)
    assert dict(pred.sources)["optimizer"] == "profile"
    slower = predict(model, cluster, cfg, replace(prof, optimizer_s_per_param=10 * prof.optimizer_s_per_param))
    assert dict(slower.breakdown)["optimizer"] == pytest.approx(10 * dict(pred.breakdown)["optimizer"])


def test_sharding_fit_splits_per_block_and_edge_exactly():
    """Two stacks at two token counts: per_block and edge lines reproduce all four overheads exactly; a
    lone-block profile (no "blocks" key, written before the split) keeps its per-block line and no edge."""
    pts = []
    for tokens, per, edge in ((1024, 5e-4, 2e-3), (4096, 3e-4, 3e-3)):
        for k in (1, STACK):
            pts.append({"group_size": 2, "reshard_after_forward": True, "blocks": k, "tokens": tokens,
                        "overhead_s": edge + k * per})
    (fit,) = fit_sharding(pts)
    for p in pts:
        assert fit.edge(p["tokens"]) + p["blocks"] * fit.overhead(p["tokens"]) == pytest.approx(p["overhead_s"], rel=1e-9)
    old = [{"group_size": 2, "reshard_after_forward": False, "tokens": t, "overhead_s": o} for t, o in ((1024, 3e-3), (2048, 3.2e-3))]
    (legacy,) = fit_sharding(old)
    assert legacy.edge is None and legacy.overhead(2048) == pytest.approx(3.2e-3)


def test_unfused_plan_charges_the_measured_unfused_core(tiny_profile):
    """flash_attention=False (megatron without TE) adds the profiled unfused core, less the analytic flash
    core, to the measured block: doubling the measured core moves the prediction by exactly that much."""
    from dataclasses import replace

    from planner.cost.layer import fit_factor
    from planner.core.job import ParallelConfig
    from planner.core.model import spec_from_dict
    from planner.cost.predict import predict
    from planner.core.profile import ComputeFit

    prof, _ = tiny_profile
    model = spec_from_dict(dict(TINY), "tiny", "test")
    cluster = cluster_for_profile(prof, None)
    cfg = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=2, global_batch_size=2, seq_len=SEQ, flash_attention=False)
    core = prof.compute_fit("attention_unfused", 1)
    doubled = ComputeFit(kind=core.kind, tp=1, fwd=core.fwd, bwd=core.bwd,
                         points=tuple((x, tuple((ph, 2 * t) for ph, t in ts)) for x, ts in core.points))
    prof2 = replace(prof, compute=tuple(doubled if c is core else c for c in prof.compute))
    a, b = dict(predict(model, cluster, cfg, prof).breakdown), dict(predict(model, cluster, cfg, prof2).breakdown)
    tokens = 2 * SEQ
    k = fit_factor(prof)  # measured layers x the profile's block-in-a-stack factor (here the CPU's gloo stacks)
    assert b["compute_fwd"] - a["compute_fwd"] == pytest.approx(TINY["num_layers"] * core.time_s("fwd", tokens) * k, rel=1e-6)


def test_cpu_profile_measures_the_pipeline_runtime_per_operation(tiny_profile):
    """profilers/pipeline.py over gloo: torch's Schedule1F1B and ScheduleInterleaved1F1B of one-block chunks over
    2 ranks at both ends of the micro-batches, each point's per-operation cost the one that makes the schedule
    simulation of the measured chunk times span the measured step."""
    from profilers.pipeline import LONG_MICROBATCHES, LONG_VPP, MICROBATCHES, VPP, solve_action_s

    prof, ticks = tiny_profile
    pts = prof.raw["communication"]["pipeline"]
    # 1F1B at one shape; interleaved at VPP x MICROBATCHES and at the longer LONG_VPP x LONG_MICROBATCHES
    shapes = {("1f1b", 1, MICROBATCHES), ("interleaved", VPP, MICROBATCHES), ("interleaved", LONG_VPP, LONG_MICROBATCHES)}
    assert {(p["schedule"], p["vpp"], p["microbatches"], p["micro_batch"]) for p in pts} == {
        (*s, m) for s in shapes for m in (1, 4) if s[1] != LONG_VPP or m == 1}  # the longer shape at the smallest
    for p in pts:
        assert p["chunk_fwd_s"] > 0 and p["chunk_bwd_s"] > 0 and p["step_s"] > 0 and p["action_s"] >= 0
        assert p["bytes"] == p["micro_batch"] * SEQ * TINY["hidden_size"] * 4  # fp32 activations: a CPU profile's dtype
        assert p["ops_per_rank"] == 2 * p["vpp"] * p["microbatches"]
        assert p["action_s"] == pytest.approx(solve_action_s(p["schedule"], p["step_s"], p["chunk_fwd_s"], p["chunk_bwd_s"],
                                                             p["vpp"], p["microbatches"]))
    assert {f.schedule for f in prof.pipeline} == {"1f1b", "interleaved"}
    inter = next(f for f in prof.pipeline if f.schedule == "interleaved")
    assert (inter.base_ops, inter.max_ops) == (2 * VPP * MICROBATCHES, 2 * LONG_VPP * LONG_MICROBATCHES)
    assert inter.growth_per_op >= 0
    assert all(prof.pipeline_action_s(k, 2 * SEQ * TINY["hidden_size"]) >= 0 for k in ("1f1b", "interleaved", "gpipe"))
    assert sum("pipeline" in label for label, *_ in ticks) == 4


def test_cpu_profile_measures_the_torch_engines_tensor_parallelism(tiny_profile):
    """profilers/tensor_parallel.py over gloo: stacks of 1 and STACK blocks under the engine's apply_tp beside the
    profiled tp-2 shard, at both ends of the micro-batches; fitted like the sharding stacks."""
    prof, ticks = tiny_profile
    pts = [p for p in prof.raw["communication"]["sharding"] if p.get("impl") in ("tp", "tp-sp")]
    assert {(p["impl"], p["blocks"], p["micro_batch"]) for p in pts} == {
        (i, b, m) for i in ("tp", "tp-sp") for b in (1, STACK) for m in (1, 4)}
    assert all(p["group_size"] == 2 and p["plain_s"] > 0 and p["wrapped_s"] > 0 for p in pts)
    assert all(p["overhead_s"] == pytest.approx(p["wrapped_s"] - p["plain_s"]) for p in pts)
    for impl in ("tp", "tp-sp"):
        fit = prof.sharding_fit(2, False, impl)
        assert fit is not None and fit.per_block_s(SEQ) >= 0 and fit.edge_s(SEQ) >= 0
    assert sum("tensor parallel" in label for label, *_ in ticks) == 4


def test_four_cpu_processes_measure_tensor_parallelism_at_every_group_size(tmp_path):
    """A 4-device node (gloo) measures the torch engine's DTensor TP at tp 2 and tp 4, with and without SP, FSDP2 over
    tp-2 shards on all four (dp 2 x tp 2), and the pipelining runtime over the first pair; a tp-4 plan of the torch
    engine is then charged the tp-4 measurement, a dp2 x tp2 ZeRO-1 plan the FSDP2 x TP one."""
    from dataclasses import replace as dc_replace

    from planner.core.job import ParallelConfig, validate_config
    from planner.core.model import load_model
    from planner.cost.predict import predict

    model = tmp_path / "tiny4.yaml"
    model.write_text(yaml.safe_dump({**TINY, "num_kv_heads": 4}))
    prof = run_profile(ProfileRequest(model=str(model), seq_len=SEQ, device="cpu", gpus_per_node=4, quick=True),
                       lambda *a: None)
    assert {(s.impl, s.group_size) for s in prof.sharding if s.impl.startswith("tp")} == {
        (i, n) for i in ("tp", "tp-sp") for n in (2, 4)}
    assert {f.schedule for f in prof.pipeline} == {"1f1b", "interleaved"} and all(f.group_size == 2 for f in prof.pipeline)
    spec = load_model(str(model))
    cfg = ParallelConfig(tp=4, seq_len=SEQ, global_batch_size=4, micro_batch_size=1)
    validate_config(spec, cfg, 4)
    cluster = cluster_for_profile(prof, None)
    fit = prof.sharding_fit(4, False, "tp")
    with_tp = dict(predict(spec, cluster, cfg, prof, engine="torch").breakdown)["tp_comm"]
    assert with_tp == pytest.approx(cfg.num_microbatches * (spec.num_layers * fit.per_block_s(SEQ) + fit.edge_s(SEQ)))
    without = dc_replace(prof, sharding=tuple(s for s in prof.sharding if not s.impl.startswith("tp")))
    assert dict(predict(spec, cluster, cfg, without, engine="torch").breakdown)["tp_comm"] != with_tp
    # FSDP2 over tp-2 shards on the whole node (dp 2 x tp 2), both modes, synchronising and accumulating; a dp2 x
    # tp2 ZeRO-1 plan of the torch engine is charged it in place of FSDP2's over whole blocks
    both = {(s.reshard_after_forward, s.accumulate is not None) for s in prof.sharding if s.impl == "fsdp2-tp2"}
    assert both == {(True, True), (False, True)}
    assert all(s.group_size == 2 for s in prof.sharding if s.impl == "fsdp2-tp2")
    cfg2 = ParallelConfig(dp=2, tp=2, zero_stage=1, seq_len=SEQ, global_batch_size=4, micro_batch_size=1)
    validate_config(spec, cfg2, 4)
    got = predict(spec, cluster, cfg2, prof, engine="torch")
    assert dict(got.sources)["sharding.per_layer.n2"] == "profile (fsdp2-tp2: FSDP2 over tp-2 shards)"
    f2 = prof.sharding_fit(2, False, "fsdp2-tp2")
    m = cfg2.num_microbatches
    per_mb = (spec.num_layers * ((m - 1) * f2.per_block_s(SEQ, False) + f2.per_block_s(SEQ)) / m
              + ((m - 1) * f2.edge_s(SEQ, False) + f2.edge_s(SEQ)) / m)
    assert dict(got.breakdown)["zero_comm"] == pytest.approx(m * per_mb)


def test_one_phase_measured_again_reuses_the_other_from_a_base_profile(tiny_profile, tmp_path):
    """--only communication / compute with --base: the other phase's raw points come from the base and every fit is
    made again; the result says what it reused. Bad combinations are one-line errors before anything is measured."""
    from planner.core.errors import DistplanError
    from planner.core.profile import save_profile

    prof, _ = tiny_profile
    base = tmp_path / "base.yaml"
    save_profile(prof, base)
    model = tmp_path / "tiny.yaml"  # the fixture's model, written again (profiles name it by its file)
    model.write_text(yaml.safe_dump(TINY))
    # --quick re-measures (fewer message sizes and repeats): what is checked is what is reused and refitted
    req = dict(model=str(model), seq_len=SEQ, device="cpu", micro_batches=(1, 2, 4), quick=True)
    comm_again = run_profile(ProfileRequest(**req, only="communication", base=str(base)), lambda *a: None)
    assert comm_again.compute == load_profile(base).compute  # the base's layers, refitted from the same points
    assert comm_again.raw["compute"] == load_profile(base).raw["compute"]
    assert comm_again.facts["reused"]["phase"] == "compute" and comm_again.facts["reused"]["from"] == str(base)
    assert {(c.op, c.group_size) for c in comm_again.collectives} == {(c.op, c.group_size) for c in prof.collectives}
    assert comm_again.sharding and comm_again.pipeline  # measured again
    assert comm_again.raw["settings"]["compute"] == load_profile(base).raw["settings"]["compute"]  # what it reused
    compute_again = run_profile(ProfileRequest(**req, only="compute", base=str(base)), lambda *a: None)
    assert compute_again.raw["communication"] == load_profile(base).raw["communication"]
    assert compute_again.collectives == load_profile(base).collectives and compute_again.facts["reused"]["phase"] == "communication"
    for bad, needle in (({"only": "compute"}, "needs --base"), ({"base": str(base)}, "needs --only"),
                        ({"only": "everything", "base": str(base)}, "one of communication, compute"),
                        ({"only": "compute", "base": str(base), "seq_len": 2 * SEQ}, f"seq_len {SEQ} \\(here {2 * SEQ}\\)")):
        with pytest.raises(DistplanError, match=needle):
            run_profile(ProfileRequest(**{**req, **bad}), lambda *a: None)


def test_one_device_measures_the_stacks_in_a_world_of_one(tmp_path):
    """One device has no collective to time, but the sharding profiler's plain stacks still run (a world of one
    process): the block-in-a-stack factor is measured (gpt2-xl on one H200 ran 6.7% over a profile without it),
    FSDP2's points sit at group size 1, and no DDP, pipelining or tensor-parallel point is attempted."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    ticks = []
    prof = run_profile(ProfileRequest(model=str(path), seq_len=SEQ, device="cpu", gpus_per_node=1, quick=True),
                       lambda label, done, total: ticks.append((label, done, total)))
    raw = prof.raw["communication"]
    assert raw["points"] == [] and raw["unmeasured"]["all"] == "one device: no collective to measure"
    shard = raw["sharding"]
    assert shard and {p["group_size"] for p in shard} == {1}
    assert {p.get("impl", "fsdp2") for p in shard} == {"fsdp2"} and {p["blocks"] for p in shard} == {1, STACK}
    assert raw["pipeline"] == []
    # the factor is the stacks' own figure: median over the larger stack's points at its most tokens, per block,
    # over the lone block's fits (at least 1)
    fit = prof.compute_fit("block", 1)
    tokens = max(p["tokens"] for p in shard)
    alone = fit.time_s("fwd", tokens) + fit.time_s("bwd", tokens)
    ratios = sorted(p["plain_s"] / p["blocks"] / alone for p in shard if p["blocks"] == STACK and p["tokens"] == tokens)
    med = ratios[len(ratios) // 2] if len(ratios) % 2 else (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
    assert prof.stack_factor() == pytest.approx(max(1.0, med))
    assert ticks and ticks[-1][1] <= ticks[-1][2]
    # and it round-trips through its file (the loader once refused group size 1: the H200 campaign's first try)
    save_profile(prof, tmp_path / "p1.yaml")
    again = load_profile(tmp_path / "p1.yaml")
    assert again.stack_factor() == pytest.approx(prof.stack_factor())
    assert {(s.group_size, s.impl) for s in again.sharding} == {(1, "fsdp2")}
