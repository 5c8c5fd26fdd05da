"""The plan file: a versioned, reviewable YAML that reloads to the same Plan.

Top-level keys: version, model, cluster, job, parallel, stages, prediction, rationale, alternatives,
sharding, provenance. Units are in key names. Loading validates the whole file and names the bad key.
Rank order inside the world is Megatron's: tp innermost, then cp, then dp, then pp outermost, so
pipeline rank i owns global ranks [i*dp*cp*tp, (i+1)*dp*cp*tp).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from planner.core.version import __version__
from planner.core.cluster import MAX_GPUS, Cluster, cluster_from_dict
from planner.core.errors import require
from planner.core.fields import NAME, NAME_RULE, flag, integer, listing, mapping, number, short, text
from planner.core.fileio import atomic_write_text, dump_yaml, read_yaml
from planner.core.job import MAX_GLOBAL_BATCH, MAX_SEQ_LEN, ParallelConfig, config_from_dict, validate_config
from planner.core.model import ModelSpec, spec_from_dict
from planner.core.prediction import Prediction

PLAN_VERSION = 1  # the plan file's format version (its `version` key)
# the plan file's top-level keys, in the order written
TOP_LEVEL = ("version", "model", "cluster", "job", "parallel", "stages", "prediction", "rationale",
             "alternatives", "sharding", "provenance")


@dataclass(frozen=True)
class Plan:
    model: ModelSpec
    cluster: Cluster
    gpus: int
    parallel: ParallelConfig
    prediction: dict  # Prediction.to_dict() at planning time (kept verbatim so reloads are exact)
    rationale: tuple[str, ...] = ()
    alternatives: tuple[dict, ...] = ()  # top-k runners-up: parallel summary, prediction, why it lost
    sharding: dict = field(default_factory=dict, hash=False)  # ILP's strategy per operator, per layer kind
    provenance: dict = field(default_factory=dict, hash=False)

    @property
    def nodes(self) -> int:
        return max(1, -(-self.gpus // self.cluster.gpus_per_node))

    def stage_devices(self, rank: int) -> list[int]:
        per = self.parallel.dp * self.parallel.cp * self.parallel.tp
        return list(range(rank * per, (rank + 1) * per))

    def stages(self) -> list[dict]:
        ranges = self.parallel.stage_layer_ranges(self.model.num_layers)
        mem = {s["rank"]: s for s in self.prediction.get("stages", [])}
        out = []
        for rank, (first, last) in enumerate(ranges):
            devs = self.stage_devices(rank)
            entry = {"rank": rank, "layers": [first, last], "num_layers": last - first + 1,
                     "devices": f"{devs[0]}-{devs[-1]}" if len(devs) > 1 else str(devs[0]),
                     "holds_embedding": rank == 0, "holds_head": rank == self.parallel.pp - 1}
            if rank in mem:
                entry["memory_gib"] = round(mem[rank]["memory_gib"], 3)
            out.append(entry)
        return out

    def to_dict(self) -> dict:
        p = self.parallel
        return {
            "version": PLAN_VERSION,
            "model": {k: v for k, v in self.model.to_dict().items() if k != "version"},
            "cluster": {**{k: v for k, v in self.cluster.to_dict().items() if k != "version"}, "gpus": self.gpus, "nodes": self.nodes},
            "job": {"global_batch_size": p.global_batch_size, "seq_len": p.seq_len, "dtype": "bf16",
                    "num_microbatches": p.num_microbatches},
            "parallel": {k: v for k, v in p.to_dict().items() if k not in ("global_batch_size", "seq_len")},
            "stages": self.stages(),
            "prediction": self.prediction,
            "rationale": list(self.rationale),
            "alternatives": list(self.alternatives),
            "sharding": self.sharding,
            "provenance": {"distplan_version": __version__, **self.provenance},
        }

    def digest(self) -> str:
        """Short hash of the plan's content (model, cluster, parallel config): names emitted files."""
        d = self.to_dict()
        core = {k: d[k] for k in ("model", "cluster", "job", "parallel")}
        return hashlib.sha256(yaml.safe_dump(core, sort_keys=True).encode()).hexdigest()[:12]


def make_plan(model: ModelSpec, cluster: Cluster, gpus: int, cfg: ParallelConfig, prediction: Prediction,
              rationale=(), alternatives=(), sharding=None, provenance=None) -> Plan:
    return Plan(model=model, cluster=cluster, gpus=gpus, parallel=cfg, prediction=_rounded(prediction.to_dict()),
                rationale=tuple(rationale), alternatives=tuple(alternatives), sharding=sharding or {},
                provenance=provenance or {})


def _rounded(obj):
    """Round floats to 6 significant digits so files are readable and reload byte-identically."""
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_rounded(v) for v in obj]
    return obj


# the comment block opening every plan file
HEADER = """\
# distplan plan file (version {version}). Review it, then `distplan emit` or `distplan run` it.
# Units are in key names. Ranks: tp innermost, then cp, dp, pp outermost (Megatron order).
# Regenerate: {command}
"""


def plan_to_yaml(plan: Plan) -> str:
    cmd = plan.provenance.get("command", "distplan solve ...")
    return HEADER.format(version=PLAN_VERSION, command=cmd) + dump_yaml(plan.to_dict(), sort_keys=False, width=110)


def save_plan(plan: Plan, path: str | Path) -> None:
    atomic_write_text(Path(path), plan_to_yaml(plan))


def plan_from_dict(d: object, source: str) -> Plan:
    require(isinstance(d, dict), f"{source}: a plan file must be a mapping with keys {', '.join(TOP_LEVEL)}")
    require(d.get("version") == PLAN_VERSION, f"{source}: plan version {short(d.get('version'))} is not supported; expected {PLAN_VERSION}")
    unknown = sorted(map(str, set(d) - set(TOP_LEVEL)))
    require(not unknown, f"{source}: unknown top-level key(s) {', '.join(unknown)[:80]}; valid: {', '.join(TOP_LEVEL)}")
    for key in ("model", "cluster", "job", "parallel", "stages", "prediction"):
        require(key in d, f"{source}: missing top-level key '{key}'")
    model = spec_from_dict(d["model"], str(d["model"].get("name", "model")) if isinstance(d["model"], dict) else "model", f"{source}: model")
    cl = dict(mapping(d, "cluster", source))
    gpus = integer(cl, "gpus", f"{source}: cluster", 1, MAX_GPUS)
    cl.pop("gpus", None)
    cl.pop("nodes", None)
    cluster = cluster_from_dict({**cl, "version": 1}, f"{source}: cluster")
    job = mapping(d, "job", source)
    par = mapping(d, "parallel", source)
    cfg = config_from_dict({**par, "global_batch_size": integer(job, "global_batch_size", f"{source}: job", 1, MAX_GLOBAL_BATCH),
                            "seq_len": integer(job, "seq_len", f"{source}: job", 1, MAX_SEQ_LEN)}, f"{source}: parallel")
    validate_config(model, cfg, gpus)
    _check_stages(d["stages"], model, cfg, source)
    pred = _checked_prediction(d["prediction"], cfg, f"{source}: prediction")
    rationale = listing(d, "rationale", source, default=[])
    require(all(isinstance(r, str) for r in rationale), f"{source}: rationale must be a list of text lines")
    alternatives = listing(d, "alternatives", source, default=[])
    for i, alt in enumerate(alternatives):
        _check_alternative(alt, f"{source}: alternatives[{i}]")
    prov = dict(mapping(d, "provenance", source, default={}))
    prov.pop("distplan_version", None)
    command = text(prov, "command", f"{source}: provenance", default="")
    require("\n" not in command and "\r" not in command, f"{source}: provenance.command must be one line")
    training = mapping(prov, "training", f"{source}: provenance", default={})
    for key in ("train_tokens", "gpu_hour_price"):
        number(training, key, f"{source}: provenance.training", 0, default=None)
    return Plan(model=model, cluster=cluster, gpus=gpus, parallel=cfg, prediction=pred, rationale=tuple(rationale),
                alternatives=tuple(alternatives), sharding=mapping(d, "sharding", source, default={}), provenance=prov)


# the prediction's numbers a plan file must hold
PREDICTION_NUMBERS = ("step_time_s", "tokens_per_s", "mfu", "peak_memory_gib", "capacity_gib")


def _checked_prediction(pred: object, cfg: ParallelConfig, where: str) -> dict:
    """The prediction as show, diff, emit and the reports read it: the keys they need, each of its type."""
    require(isinstance(pred, dict), f"{where} must be a mapping with {', '.join(PREDICTION_NUMBERS)}")
    for key in (*PREDICTION_NUMBERS, "fits", "breakdown", "stages"):
        require(key in pred, f"{where}: plan prediction lacks '{key}'; regenerate the plan with `distplan solve` or "
                             "`distplan estimate`")
    for key in PREDICTION_NUMBERS:
        number(pred, key, where, 0)
    for key in ("model_tflops_per_gpu", "hardware_tflops_per_gpu", "allocator_slack", "host_memory_gib", "host_capacity_gib"):
        if key in pred:
            number(pred, key, where, 0)
    flag(pred, "fits", where)
    for term in mapping(pred, "breakdown", where):
        require(NAME.fullmatch(term) is not None, f"{where}.breakdown: term {short(term)} must be {NAME_RULE}")
        number(pred["breakdown"], term, f"{where}.breakdown")
    stages = listing(pred, "stages", where)
    require(len(stages) == cfg.pp, f"{where}: plan prediction.stages must list {cfg.pp} stages (pp = {cfg.pp})")
    for i, st in enumerate(stages):
        at = f"{where}.stages[{i}]"
        require(isinstance(st, dict), f"{at} must be a mapping")
        integer(st, "rank", at, 0)
        number(st, "time_per_microbatch_s", at, 0)
        number(st, "memory_gib", at, 0)
        for part in mapping(st, "memory_breakdown_gib", at):
            number(st["memory_breakdown_gib"], part, f"{at}.memory_breakdown_gib")
    return pred


def _check_alternative(alt: object, where: str) -> None:
    """A runner-up as show and the reports read it (solvers.explain.alternative_entry writes it)."""
    require(isinstance(alt, dict), f"{where} must be a mapping (parallel, step_time_s, why_lost, ...)")
    pred = mapping(alt, "prediction", where, default={})
    for d, at in ((alt, where), (pred, f"{where}.prediction")):
        for key in ("step_time_s", "tokens_per_s", "mfu", "peak_memory_gib"):
            number(d, key, at, 0, default=None)
        flag(d, "fits", at, default=None)
    for key in ("name", "summary", "why_lost", "why", "reason", "lost_because"):
        text(alt, key, where, default=None)
    if not isinstance(alt.get("parallel"), dict):
        text(alt, "parallel", where, default=None)


def _check_stages(stages: object, model: ModelSpec, cfg: ParallelConfig, source: str) -> None:
    """Stage layer ranges must cover every layer exactly once, in order, matching parallel.layer_split."""
    require(isinstance(stages, list) and len(stages) == cfg.pp,
            f"{source}: 'stages' must list {cfg.pp} pipeline stages (pp = {cfg.pp})")
    expect = 0
    for i, st in enumerate(stages):
        layers = st.get("layers") if isinstance(st, dict) else None
        require(isinstance(layers, list) and len(layers) == 2 and all(type(x) is int for x in layers),
                f"{source}: stages[{i}].layers must be [first, last], two integers")
        first, last = layers
        require(first == expect and last >= first,
                f"{source}: stages[{i}].layers {layers} must start at layer {expect} (ranges cover the model once, in order)")
        expect = last + 1
    require(expect == model.num_layers, f"{source}: stages cover layers 0-{expect - 1}, but {model.name} has {model.num_layers} layers")
    ranges = cfg.stage_layer_ranges(model.num_layers)
    got = [tuple(st["layers"]) for st in stages]
    require(got == [tuple(r) for r in ranges],
            f"{source}: stages {got} disagree with parallel.layer_split {list(cfg.layers_per_stage(model.num_layers))}")


def load_plan(path: str | Path) -> Plan:
    data = read_yaml(path, "plan file", hint=f"; create one with `distplan solve -o {path}`")
    return plan_from_dict(data, str(path))
