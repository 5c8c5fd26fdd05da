"""Published reference cases (configs/reference/published.yaml) as distplan objects.

Used by the tests and benchmarks that check the cost model and the solver against published results:
Megatron-LM SC'21 Tables 1 and 2 (GPT on A100s), ZeRO's model-state memory, Korthikanti's activation formulas,
torchtitan's FSDP2 throughput (Llama on A100s and H100s).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import yaml

from planner.core.cluster import Cluster, load_cluster

from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec, load_model

SC21_VOCAB = 51200  # the GPT vocabulary of Narayanan et al. SC'21, Table 1
SC21_SEQ_LEN = 2048  # its sequence length (SC'21, Table 1)


def published() -> dict:
    return yaml.safe_load((resources.files("configs") / "reference" / "published.yaml").read_text())


@dataclass(frozen=True)
class Sc21Case:
    params_billion: float
    model: ModelSpec
    gpus: int
    config: ParallelConfig  # the published parallel configuration, with distplan's stated assumptions
    achieved_tflops_per_gpu: float


def sc21_gpt(params_billion: float, heads: int, hidden: int, layers: int) -> ModelSpec:
    return ModelSpec(name=f"sc21-gpt-{params_billion}b", family="gpt", num_layers=layers, hidden_size=hidden,
                     ffn_hidden_size=4 * hidden, num_heads=heads, num_kv_heads=heads, vocab_size=SC21_VOCAB,
                     max_seq_len=SC21_SEQ_LEN, tie_embeddings=True, default_global_batch=512,
                     dropout=0.1)  # Megatron-LM's default hidden and attention dropout


def sc21_table1() -> list[Sc21Case]:
    """Table 1 rows with the assumptions written in published.yaml (micro-batch 1, v=2 where layers allow)."""
    out = []
    for p, heads, hidden, layers, tp, pp, gpus, batch, tflops, _pct in published()["megatron_lm_sc21_table1"]["rows"]:
        vpp = 2 if pp > 1 and layers % (2 * pp) == 0 else 1
        cfg = ParallelConfig(dp=gpus // (tp * pp), tp=tp, pp=pp, vpp=vpp, schedule="interleaved" if vpp > 1 else "1f1b",
                             micro_batch_size=1, global_batch_size=batch, seq_len=SC21_SEQ_LEN, recompute="full",
                             flash_attention=False, overlap_grad_reduce=False)
        out.append(Sc21Case(p, sc21_gpt(p, heads, hidden, layers), gpus, cfg, float(tflops)))
    return out


def model_yaml(spec: ModelSpec) -> str:
    """Zoo-format YAML of a spec (so the CLI can take it with --model path.yaml)."""
    return yaml.safe_dump(spec.to_dict(), sort_keys=False)


def sc21_table2() -> list[tuple[str, Sc21Case]]:
    """Table 2: GPT-3 175B with ZeRO-3 (no model parallelism) and with PTD-P (tp 8 x pp 12), A100."""
    out = []
    model = sc21_gpt(174.6, 96, 12288, 96)
    for scheme, p, mp, batch, gpus, mb, tflops in published()["megatron_lm_sc21_table2"]["rows"]:
        if scheme == "zero3":
            cfg = ParallelConfig(dp=gpus, zero_stage=3, micro_batch_size=mb, global_batch_size=batch, seq_len=SC21_SEQ_LEN,
                                 recompute="full", flash_attention=False, overlap_grad_reduce=False)
        else:
            cfg = ParallelConfig(dp=gpus // mp, tp=8, pp=mp // 8, vpp=2, schedule="interleaved", micro_batch_size=mb,
                                 global_batch_size=batch, seq_len=SC21_SEQ_LEN, recompute="full", flash_attention=False,
                                 overlap_grad_reduce=False)
        out.append((scheme, Sc21Case(p, model, gpus, cfg, float(tflops))))
    return out


# torchtitan's activation checkpointing -> distplan's recompute (published.yaml's torchtitan_performance says why)
TORCHTITAN_RECOMPUTE = {"none": "none", "full": "full", "selective op": "selective"}


@dataclass(frozen=True)
class TorchtitanCase:
    group: str  # a100 or h100 (published.yaml's groups)
    model: ModelSpec
    cluster: Cluster
    config: ParallelConfig  # FSDP2 as ZeRO-3 over every GPU
    checkpointing: str  # as torchtitan names it
    tokens_per_s_per_gpu: float
    mfu_percent: float | None  # torchtitan's MFU (None where the page does not report it)


def torchtitan_performance() -> list[TorchtitanCase]:
    """The FSDP2 rows of torchtitan's performance page that distplan models (bf16, eager, no per-block recompute)."""
    out = []
    for group in published()["torchtitan_performance"]["groups"]:
        name = group["cluster"]
        cluster = load_cluster(str(resources.files("configs") / "reference" / name) if name.endswith(".yaml") else name)
        for model, gpus, batch, seq, ac, wps, mfu in group["rows"]:
            cfg = ParallelConfig(dp=gpus, zero_stage=3, micro_batch_size=batch, global_batch_size=batch * gpus,
                                 seq_len=seq, recompute=TORCHTITAN_RECOMPUTE[ac])
            out.append(TorchtitanCase(group["name"], load_model(model), cluster, cfg, ac, float(wps),
                                      None if mfu is None else float(mfu)))
    return out
