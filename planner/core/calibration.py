"""Calibration files: `distplan run --calibrate`'s measured-over-predicted factors, apart from the profile.

A factor corrects one predictor on one kind of job: the engine that ran it (DeepSpeed's step is not the torch
engine's), the GPU, the model's shape and sequence length (planner.cost.profiled.model_shape), and the profile the
predictions were made with (its file's digest; "none": the cluster preset alone). Each record keeps its runs
(planner/runner/calibrate.py fits the factors over them) and is applied only to a job with the same key. The
measured profile is never written: a record names the profile by digest, so a re-measured profile starts afresh.

File (YAML, version 1):

    version: 1
    records:
      - {engine: torch, gpu: NVIDIA H200, model: gpt2-xl, model_shape: {family: gpt, hidden_size: 1600, ...},
         seq_len: 1024, profile: 3f0c2a9e1b7d4c55, profile_path: h200.yaml,
         factors: {compute: 1.07, all_reduce: 0.95},
         runs: [{plan_digest, model, config, device, dtype, measured_step_time_s, fixed_s, terms_s}, ...]}
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from pathlib import Path

from planner.core.errors import require
from planner.core.fields import is_number, short
from planner.core.fileio import dump_yaml, read_yaml
from planner.core.model import ModelSpec
from planner.core.profile import Profile
from planner.core.cluster import gpu_family
from planner.core.model import describe_shape, model_shape

CALIBRATION_VERSION = 1  # the calibration file's format version (its `version` key)
NO_PROFILE = "none"  # the profile key of runs predicted without a profile (the cluster preset alone)
# distplan run's engines (the engine table's rows with a runner; core imports no cost module, and
# tests/test_engine_table.py holds the two equal): a calibration is per engine
ENGINES = ("torch", "deepspeed", "megatron")
DIGEST_CHARS = 16  # hex characters of the profile file's sha256 kept as its key


@dataclass(frozen=True)
class CalibrationRecord:
    engine: str
    gpu: str  # the GPU the runs ran on (matched by planner.core.profile.gpu_family)
    model: str  # the first model calibrated with this shape, for reading
    model_shape: tuple[tuple[str, object], ...]
    seq_len: int
    profile: str  # digest of the profile file the predictions used (profile_digest), or NO_PROFILE
    profile_path: str = ""  # where that profile was, for reading
    factors: tuple[tuple[str, float], ...] = ()
    runs: tuple[dict, ...] = ()

    @property
    def key(self) -> tuple:
        return self.engine, gpu_family(self.gpu), self.model_shape, self.seq_len, self.profile

    def describe(self) -> str:
        against = "the preset" if self.profile == NO_PROFILE else f"profile {self.profile_path or self.profile}"
        return f"{self.engine} {self.model} seq {self.seq_len} on {gpu_family(self.gpu)} against {against}"


@dataclass(frozen=True)
class Calibration:
    records: tuple[CalibrationRecord, ...] = ()

    def find(self, key: tuple) -> CalibrationRecord | None:
        return next((r for r in self.records if r.key == key), None)

    def with_record(self, record: CalibrationRecord) -> Calibration:
        """This calibration with `record` in place of the one of its key (appended where none was)."""
        if self.find(record.key) is None:
            return Calibration(self.records + (record,))
        return Calibration(tuple(record if r.key == record.key else r for r in self.records))


def profile_digest(profile_path: str | Path | None) -> str:
    """The key of the profile file the predictions used: the start of its bytes' sha256 (NO_PROFILE without one)."""
    if profile_path is None:
        return NO_PROFILE
    return hashlib.sha256(Path(profile_path).read_bytes()).hexdigest()[:DIGEST_CHARS]


def job_key(engine: str, gpu_name: str, model: ModelSpec, seq_len: int, profile: str) -> tuple:
    return engine, gpu_family(gpu_name), model_shape(model), seq_len, profile


def _record(r: object, where: str) -> CalibrationRecord:
    require(isinstance(r, dict), f"{where}: expected a mapping")
    for key in ("engine", "gpu", "model", "model_shape", "seq_len", "profile", "factors", "runs"):
        require(key in r, f"{where}: missing key '{key}'")
    require(isinstance(r["engine"], str) and r["engine"] in ENGINES,
            f"{where}: engine {short(r['engine'])} is not one of {', '.join(ENGINES)}")
    shape, factors, runs = r["model_shape"], r["factors"], r["runs"]
    require(isinstance(shape, dict) and shape, f"{where}: model_shape must be a mapping")
    require(isinstance(factors, dict) and all(is_number(v) and v > 0 for v in factors.values()),
            f"{where}: factors must map a term to a positive number, got {short(factors)}")
    require(isinstance(runs, list) and all(isinstance(x, dict) for x in runs),
            f"{where}: runs must be a list of mappings")
    require(isinstance(r["seq_len"], int) and not isinstance(r["seq_len"], bool) and r["seq_len"] > 0,
            f"{where}: seq_len must be a positive integer")
    return CalibrationRecord(engine=str(r["engine"]), gpu=str(r["gpu"]), model=str(r["model"]),
                             model_shape=tuple(shape.items()), seq_len=int(r["seq_len"]), profile=str(r["profile"]),
                             profile_path=str(r.get("profile_path") or ""),
                             factors=tuple(sorted((str(k), float(v)) for k, v in factors.items())), runs=tuple(runs))


def calibration_from_dict(d: object, source: str) -> Calibration:
    require(isinstance(d, dict), f"{source}: expected a mapping with version and records")
    require(d.get("version") == CALIBRATION_VERSION,
            f"{source}: calibration version {d.get('version')!r} is not supported; expected {CALIBRATION_VERSION}")
    records = d.get("records") or []
    require(isinstance(records, list), f"{source}: records must be a list")
    return Calibration(tuple(_record(r, f"{source}: record {i + 1}") for i, r in enumerate(records)))


def calibration_to_dict(c: Calibration) -> dict:
    return {"version": CALIBRATION_VERSION,
            "records": [{"engine": r.engine, "gpu": r.gpu, "model": r.model, "model_shape": dict(r.model_shape),
                         "seq_len": r.seq_len, "profile": r.profile, "profile_path": r.profile_path,
                         "factors": dict(r.factors), "runs": list(r.runs)} for r in c.records]}


def load_calibration(path: str | Path, missing_ok: bool = False) -> Calibration:
    """The calibration file at `path`; an empty one where it does not exist and `missing_ok` (run --calibrate
    starts it)."""
    path = Path(path)
    if missing_ok and not path.exists() and not path.is_symlink():
        return Calibration()
    data = read_yaml(path, "calibration file", hint=f"; write one with `distplan run PLAN --calibrate --calibration {path}`")
    return calibration_from_dict(data, str(path))


def save_calibration(c: Calibration, path: str | Path) -> None:
    from planner.core.fileio import atomic_write_text

    atomic_write_text(Path(path), dump_yaml(calibration_to_dict(c), sort_keys=False))


def apply_calibration(profile: Profile | None, path: str | Path | None, *, engine: str, gpu_name: str,
                      model: ModelSpec, seq_len: int, profile_path: str | Path | None) -> tuple[Profile | None, str]:
    """(the profile to predict with, one line saying what was applied): the factors of `path`'s record for this
    engine, GPU, model shape, sequence length and profile file, carried by `profile` (Profile.calibration; a profile
    of nothing measured where none was given, which predicts as the preset does); unchanged where `path` is None or
    no record matches (the line says why)."""
    if path is None:
        return profile, ""
    cal = load_calibration(path)
    if engine not in ENGINES:
        return profile, (f"calibration: none applied from {path}: its factors are per engine; pass --engine "
                         f"{', '.join(ENGINES)} to apply that engine's")
    key = job_key(engine, gpu_name, model, seq_len, profile_digest(profile_path))
    rec = cal.find(key)
    if rec is None:
        held = "; ".join(r.describe() for r in cal.records[:3]) + ("; ..." if len(cal.records) > 3 else "")
        against = f"profile {profile_path}" if profile_path else "the preset"
        return profile, (f"calibration: none applied from {path}: no record for {engine} "
                         f"{describe_shape(model.name, model_shape(model), seq_len)} on {gpu_family(gpu_name)} against "
                         f"{against}" + (f" (it holds {held})" if held else " (it is empty)"))
    carrier = profile if profile is not None else Profile(gpu_name=gpu_name, device="cuda", model=model.name,
                                                          seq_len=seq_len, dtype="bf16", model_shape=model_shape(model))
    source = f"{len(rec.runs)} {engine} run{'s' if len(rec.runs) != 1 else ''} of this shape ({path})"
    factors = ", ".join(f"{k} x{v:.3f}" for k, v in rec.factors)
    return replace(carrier, calibration=rec.factors, calibration_source=source), f"calibration: {factors} from {source}"
