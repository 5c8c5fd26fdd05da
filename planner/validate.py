"""The public validation suite: distplan's predictions against published measurements (`distplan validate`).

Each suite turns the published rows of configs/reference/published.yaml (loaded by planner.core.published) into
(published, predicted) pairs through the one cost model; the report's means and maxima are computed from those rows
and nothing else. Nothing here is fitted: a suite's error is what the cost model predicts today. As Calculon's
`llm-validation`, but over distplan's own references:

- sc21_table1: Megatron-LM SC'21 Table 1, achieved TFLOP/s per GPU (ten GPT models, 32-3072 A100s);
- sc21_table2: its Table 2, GPT-3 175B with PTD-P and with DeepSpeed ZeRO-3 (not calibrated; ZeRO-3 far off);
- zero_memory: ZeRO's model-state GB per GPU by stage (7.5B parameters, Nd = 64);
- torchtitan: torchtitan's FSDP2 tokens/s per GPU (Llama 2 and 3 on 64 A100s, Llama 3.1 8B on H100s).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Callable

from planner.core.cluster import load_cluster
from planner.core.errors import require
from planner.core.prediction import Prediction
from planner.core.published import published, sc21_table1, sc21_table2, torchtitan_performance
from planner.cost.memory import zero_model_state_bytes
from planner.cost.predict import predict

SC21_CLUSTER = "dgx-a100-80gb"  # Selene's DGX A100-80GB nodes (published.yaml, megatron_lm_sc21_table1.hardware)


@dataclass(frozen=True)
class Row:
    case: str  # what was measured, in a few words
    published: float
    predicted: float
    note: str = ""
    # the same quantity at the pessimistic estimate (planner/cost/mechanisms.py), where the row relies on an
    # unchecked mechanism; the published number should lie between it and `predicted`
    pessimistic: float | None = None

    @property
    def bracketed(self) -> bool | None:
        """Whether the published number lies between the pessimistic and the expected prediction (None: no bound)."""
        if self.pessimistic is None:
            return None
        return min(self.pessimistic, self.predicted) <= self.published <= max(self.pessimistic, self.predicted)

    @property
    def error(self) -> float:
        """Relative error of the prediction (+0.05: predicted 5% above the published number)."""
        return self.predicted / self.published - 1


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    quantity: str  # what the numbers are, with their unit
    source: str
    note: str  # how to read the errors
    rows: tuple[Row, ...]

    @property
    def mean_abs_error(self) -> float:
        return statistics.mean(abs(r.error) for r in self.rows)

    @property
    def max_abs_error(self) -> float:
        return max(abs(r.error) for r in self.rows)


@dataclass(frozen=True)
class Report:
    suites: tuple[Suite, ...]

    @property
    def rows(self) -> list[tuple[Suite, Row]]:
        return [(s, r) for s in self.suites for r in s.rows]

    @property
    def mean_abs_error(self) -> float:
        """Over every row of every suite (each row weighs the same)."""
        return statistics.mean(abs(r.error) for _, r in self.rows)

    @property
    def max_abs_error(self) -> float:
        return max(abs(r.error) for _, r in self.rows)

    @property
    def worst(self) -> tuple[Suite, Row]:
        return max(self.rows, key=lambda sr: abs(sr[1].error))


def _at_bound(pred: Prediction, value: float) -> float | None:
    """A throughput `value` of `pred` at its pessimistic step (None where it relies on no unchecked mechanism)."""
    return None if pred.pessimistic_step_time_s is None else value * pred.step_time_s / pred.pessimistic_step_time_s


# ---- the suites ----------------------------------------------------------------------------------


def _sc21_table1() -> Suite:
    cluster = load_cluster(SC21_CLUSTER)
    rows = []
    for case in sc21_table1():
        c = case.config
        got = predict(case.model, cluster, c).hardware_tflops_per_gpu
        rows.append(Row(f"{case.params_billion}B tp{c.tp} pp{c.pp} dp{c.dp} vpp{c.vpp}, {case.gpus} GPUs, "
                        f"batch {c.global_batch_size}", case.achieved_tflops_per_gpu, got))
    ref = published()["megatron_lm_sc21_table1"]
    return Suite("sc21_table1", "Megatron-LM SC'21 Table 1 (GPT, A100-80GB, full recompute)",
                 "achieved TFLOP/s per GPU (counting recompute)", ref["source"],
                 f"cluster preset {SC21_CLUSTER}, whose GEMM-efficiency curve and memory-bound fraction were fitted to "
                 "these rows; unstated settings (micro-batch 1, 2 virtual stages where layers divide) as published.yaml "
                 "assumes", tuple(rows))


def _sc21_table2() -> Suite:
    cluster = load_cluster(SC21_CLUSTER)
    rows = []
    for scheme, case in sc21_table2():
        c = case.config
        layout = "ZeRO-3" if scheme == "zero3" else f"PTD-P tp{c.tp} pp{c.pp}"
        pred = predict(case.model, cluster, c)
        got = pred.hardware_tflops_per_gpu
        rows.append(Row(f"{layout}, {case.gpus} GPUs, micro-batch {c.micro_batch_size}",
                        case.achieved_tflops_per_gpu, got, ", ".join(pred.unchecked), _at_bound(pred, got)))
    ref = published()["megatron_lm_sc21_table2"]
    return Suite("sc21_table2", "Megatron-LM SC'21 Table 2 (GPT-3 175B: PTD-P vs ZeRO-3, A100-80GB)",
                 "achieved TFLOP/s per GPU (counting recompute)", ref["source"],
                 "not calibrated against. The ZeRO-3 rows are over-predicted by the expected estimate: DeepSpeed's "
                 "ZeRO-3 of 2021 scaled as if bound by one NIC per GPU, where NCCL's rings over every NIC of a node "
                 "would be 8x faster; the mechanisms this relies on are unchecked (planner/cost/mechanisms.py), and "
                 "the published numbers lie between the pessimistic estimate (one NIC per GPU, not overlapped) and "
                 "the expected one, which is what `solve` ranks by and shows",
                 tuple(rows))


def _zero_memory() -> Suite:
    ref = published()["zero_model_state_memory"]
    rows = tuple(Row(f"ZeRO-{stage}, {ref['params'] / 1e9:g}B parameters, Nd {ref['dp']}", float(gb),
                     zero_model_state_bytes(ref["params"], ref["dp"], stage) / 1e9)
                 for stage, gb in ref["gb_per_gpu"].items())
    return Suite("zero_memory", "ZeRO model-state memory (Rajbhandari et al. SC'20)", "GB per GPU", ref["source"],
                 "model states only (16 bytes per parameter before sharding, mixed-precision Adam)", rows)


def _torchtitan() -> Suite:
    rows = []
    for case in torchtitan_performance():
        pred = predict(case.model, case.cluster, case.config, engine="torch")
        c = case.config
        mfu = f"published {case.mfu_percent:g}%, " if case.mfu_percent is not None else ""
        fits = "" if pred.fits else "; predicted not to fit"
        rows.append(Row(f"{case.model.name} {c.gpus}x{case.group.upper()} b{c.micro_batch_size} s{c.seq_len} "
                        f"AC {case.checkpointing}", case.tokens_per_s_per_gpu, pred.tokens_per_s / c.gpus,
                        f"MFU {mfu}predicted {100 * pred.mfu:.1f}%{fits}", _at_bound(pred, pred.tokens_per_s / c.gpus)))
    ref = published()["torchtitan_performance"]
    return Suite("torchtitan", "torchtitan FSDP2 throughput (Llama, bf16 eager)", "tokens/s per GPU (WPS)",
                 ref["source"],
                 "FSDP2 priced as ZeRO-3 by distplan's torch engine, no profile; A100 rows on dgx-a100-80gb, H100 rows "
                 "on configs/reference/grand-teton-h100-96gb.yaml (peak and 500 W clocks unknown: an upper bound). "
                 "'selective op' maps to distplan's selective recompute, which with flash attention recomputes "
                 "nothing, where torchtitan's recomputes every other matmul and the elementwise ops: those rows are "
                 "over-predicted", tuple(rows))


# the suites by name, in report order (an explicit registry: nothing registers itself)
SUITES: dict[str, Callable[[], Suite]] = {
    "sc21_table1": _sc21_table1,
    "sc21_table2": _sc21_table2,
    "zero_memory": _zero_memory,
    "torchtitan": _torchtitan,
}


def parse_suites(text: str | None) -> tuple[str, ...]:
    """Comma-separated suite names (None: every suite), each known."""
    if text is None:
        return tuple(SUITES)
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in SUITES]
    require(names and not unknown, f"--suite '{text}' is unknown; valid: {', '.join(SUITES)} (comma-separated)")
    return tuple(dict.fromkeys(names))


def run_validation(names: tuple[str, ...] | None = None) -> Report:
    """Every row of the named suites (default: all), predicted today."""
    report = Report(tuple(SUITES[n]() for n in (names or tuple(SUITES))))
    bad = [f"{s.name}: {r.case}" for s, r in report.rows if not math.isfinite(r.predicted)]
    require(not bad, f"non-finite prediction for {', '.join(bad)}")
    return report


def check_limit_values(max_mean_error: float | None, max_row_error: float | None) -> None:
    for flag, value in (("--max-mean-error", max_mean_error), ("--max-row-error", max_row_error)):
        require(value is None or (math.isfinite(value) and value >= 0),
                f"{flag} must be a fraction >= 0 (0.05 is 5%), got {value}")


def check_limits(report: Report, max_mean_error: float | None, max_row_error: float | None) -> str | None:
    """One line naming what exceeds the limits (fractions: 0.05 is 5%), or None when nothing does."""
    check_limit_values(max_mean_error, max_row_error)
    problems = []
    if max_mean_error is not None:
        over = sorted((s for s in report.suites if s.mean_abs_error > max_mean_error), key=lambda s: -s.mean_abs_error)
        if over:
            problems.append(f"mean |error| above --max-mean-error {100 * max_mean_error:g}% in "
                            + ", ".join(f"{s.name} ({100 * s.mean_abs_error:.1f}%)" for s in over))
    if max_row_error is not None:
        over = [(s, r) for s, r in report.rows if abs(r.error) > max_row_error]
        if over:
            suite, row = report.worst
            problems.append(f"{len(over)} row(s) above --max-row-error {100 * max_row_error:g}%; worst "
                            f"{suite.name} '{row.case}' {100 * row.error:+.1f}%")
    return "; ".join(problems) or None


# ---- the report as text --------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _bound_cell(r: Row) -> str:
    if r.pessimistic is None:
        return ""
    return f"{r.pessimistic:.1f} ({'published between' if r.bracketed else 'published outside'})"


def to_markdown(report: Report) -> str:
    """The report as Markdown: per suite its rows, mean and max |error|; then the summary over every row."""
    out = ["# distplan validate: predictions against published measurements", ""]
    for s in report.suites:
        out += [f"## {s.name}: {s.title}", "", f"{s.quantity}. Source: {s.source}.", "",
                "| row | published | predicted | error | pessimistic | note |", "|---|---|---|---|---|---|"]
        out += [f"| {r.case} | {r.published:g} | {r.predicted:.1f} | {100 * r.error:+.1f}% | "
                f"{_bound_cell(r)} | {r.note} |" for r in s.rows]
        out += ["", f"{s.name}: {len(s.rows)} rows, mean |error| {_pct(s.mean_abs_error)}, max |error| "
                    f"{_pct(s.max_abs_error)}. {s.note[0].upper()}{s.note[1:]}.", ""]
    out += ["## Summary", "", "| suite | rows | mean abs error | max abs error |", "|---|---|---|---|"]
    out += [f"| {s.name} | {len(s.rows)} | {_pct(s.mean_abs_error)} | {_pct(s.max_abs_error)} |" for s in report.suites]
    out += [f"| overall | {len(report.rows)} | {_pct(report.mean_abs_error)} | {_pct(report.max_abs_error)} |"]
    return "\n".join(out) + "\n"


def to_json(report: Report) -> dict:
    suites = [{"name": s.name, "title": s.title, "quantity": s.quantity, "source": s.source, "note": s.note,
               "mean_abs_error": s.mean_abs_error, "max_abs_error": s.max_abs_error,
               "rows": [{"case": r.case, "published": r.published, "predicted": r.predicted, "error": r.error,
                         "note": r.note, **({"pessimistic": r.pessimistic, "published_between": r.bracketed}
                                            if r.pessimistic is not None else {})} for r in s.rows]} for s in report.suites]
    return {"suites": suites, "overall": {"rows": len(report.rows), "mean_abs_error": report.mean_abs_error,
                                          "max_abs_error": report.max_abs_error}}
