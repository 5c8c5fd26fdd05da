"""A training configuration: parallel degrees, batching, schedule, ZeRO, recompute.

`ParallelConfig` is what `distplan estimate` takes by hand and what `distplan solve` chooses.
Conventions (Megatron-LM's): N = dp * tp * pp * cp; expert parallelism ep is carved out of the
dp * cp ranks (ep divides dp * cp); micro-batches per step m = global_batch / (micro_batch * dp).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from planner.core.errors import DistplanError, require
from planner.core.model import ModelSpec

# pipeline schedules (1F1B and interleaved: Narayanan et al. SC'21; GPipe: Huang et al. 2019)
SCHEDULES = ("1f1b", "gpipe", "interleaved")
RECOMPUTE = ("none", "selective", "full")  # activation recomputation: none, selective (Korthikanti et al. 2022) or full
MAX_DEGREE = 2**20  # largest parallel degree: the largest GPU count planned (planner.core.cluster.MAX_GPUS)
MAX_GLOBAL_BATCH = 2**20  # sequences per step: 16x the largest published (BERT with LAMB: 65536; GPT-3: 1536)
MAX_SEQ_LEN = 2**24  # tokens per sequence: beyond the longest context trained (10M, Llama 4 Scout)
# largest value accepted per ParallelConfig field
LIMITS = {"dp": MAX_DEGREE, "tp": MAX_DEGREE, "pp": MAX_DEGREE, "cp": MAX_DEGREE, "ep": MAX_DEGREE, "vpp": MAX_DEGREE,
          "micro_batch_size": MAX_GLOBAL_BATCH, "global_batch_size": MAX_GLOBAL_BATCH, "seq_len": MAX_SEQ_LEN}


@dataclass(frozen=True)
class ParallelConfig:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallel: the sequence split across ranks (ring attention)
    ep: int = 1  # expert parallel: experts split across ranks of the dp*cp group
    vpp: int = 1  # virtual pipeline stages (model chunks) per pipeline rank, interleaved schedule
    sequence_parallel: bool = False  # Korthikanti et al. 2022: norms/dropout sharded over tp
    zero_stage: int = 0
    offload_optimizer: bool = False  # optimizer states and step on the host (DeepSpeed ZeRO-Offload)
    micro_batch_size: int = 1
    global_batch_size: int = 512
    seq_len: int = 2048
    schedule: str = "1f1b"
    recompute: str = "none"
    layer_split: tuple[int, ...] = ()  # layers per pipeline rank; () -> as even as possible
    flash_attention: bool = True  # fused attention kernel (no s*s activations); False: unfused softmax
    overlap_grad_reduce: bool = True  # data-parallel gradient reduction overlapped with backward

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    def layers_per_stage(self, num_layers: int) -> tuple[int, ...]:
        """Layers held by each pipeline rank (all of its virtual chunks together)."""
        if self.layer_split:
            return self.layer_split
        base, extra = divmod(num_layers, self.pp)
        # remainder on the middle ranks: the first holds the embedding, the last the head
        order = sorted(range(self.pp), key=lambda i: (i in (0, self.pp - 1), i))
        bonus = set(order[:extra])
        return tuple(base + (1 if i in bonus else 0) for i in range(self.pp))

    def stage_layer_ranges(self, num_layers: int) -> list[tuple[int, int]]:
        """[first, last] layer index (inclusive) of each pipeline rank's contiguous block.

        With vpp > 1 a rank's layers are not contiguous in the model; the ranges then describe
        rank r's share in layer-count order (chunk c of rank r holds layers of virtual stage c*pp + r).
        """
        out, start = [], 0
        for n in self.layers_per_stage(num_layers):
            out.append((start, start + n - 1))
            start += n
        return out

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layer_split"] = list(self.layer_split)
        return d


def config_from_dict(data: dict, source: str = "parallel") -> ParallelConfig:
    require(isinstance(data, dict), f"{source}: expected a mapping")
    valid = set(ParallelConfig.__dataclass_fields__)
    unknown = sorted(set(data) - valid)
    require(not unknown, f"{source}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(valid))}")
    data = dict(data)
    if "layer_split" in data:
        ls = data["layer_split"] or []
        require(isinstance(ls, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in ls),
                f"{source}: layer_split must be a list of integers, got {ls!r}")
        data["layer_split"] = tuple(ls)
    for key, value in data.items():
        typ = ParallelConfig.__dataclass_fields__[key].type
        if typ == "int":
            require(isinstance(value, int) and not isinstance(value, bool), f"{source}: {key} must be an integer, got {value!r}")
        if typ == "bool":
            require(isinstance(value, bool), f"{source}: {key} must be true or false, got {value!r}")
        if typ == "str":
            require(isinstance(value, str), f"{source}: {key} must be a string, got {value!r}")
    return ParallelConfig(**data)


def validate_config(model: ModelSpec, cfg: ParallelConfig, gpus: int | None = None) -> None:
    """Raise DistplanError naming the first rule `cfg` breaks for `model` (Megatron-LM's rules)."""
    for key, most in LIMITS.items():
        require(getattr(cfg, key) >= 1, f"{key} must be >= 1, got {getattr(cfg, key)}")
        require(getattr(cfg, key) <= most, f"{key} must be at most {most}, got {getattr(cfg, key)}")
    if gpus is not None:
        require(gpus >= 1, f"--gpus must be a positive integer, got {gpus}")
        require(cfg.gpus == gpus,
                f"dp*tp*pp*cp = {cfg.dp}*{cfg.tp}*{cfg.pp}*{cfg.cp} = {cfg.gpus} does not equal --gpus {gpus}")
    require(cfg.schedule in SCHEDULES, f"schedule '{cfg.schedule}' is unknown; valid: {', '.join(SCHEDULES)}")
    require(cfg.recompute in RECOMPUTE, f"recompute '{cfg.recompute}' is unknown; valid: {', '.join(RECOMPUTE)}")
    require(cfg.zero_stage in (0, 1, 2, 3), f"zero stage {cfg.zero_stage} is unknown; valid: 0, 1, 2, 3")
    require(not cfg.offload_optimizer or cfg.zero_stage >= 1,
            "optimizer offload needs ZeRO stage 1, 2 or 3 (the offloaded states are the partitioned ones)")
    require(model.num_heads % cfg.tp == 0, f"tp {cfg.tp} does not divide the {model.num_heads} attention heads of {model.name}")
    require(model.num_kv_heads % cfg.tp == 0 or cfg.tp % model.num_kv_heads == 0,
            f"tp {cfg.tp} and the {model.num_kv_heads} KV heads of {model.name}: one must divide the other")
    require(not cfg.sequence_parallel or cfg.tp > 1, "sequence parallel needs tp > 1")
    require(cfg.ep == 1 or model.is_moe, f"ep {cfg.ep} > 1 needs a mixture-of-experts model; {model.name} is dense")
    if model.is_moe:
        require(model.num_experts % cfg.ep == 0, f"ep {cfg.ep} does not divide the {model.num_experts} experts of {model.name}")
    require((cfg.dp * cfg.cp) % cfg.ep == 0, f"ep {cfg.ep} must divide dp*cp = {cfg.dp * cfg.cp} (experts are split across data-parallel ranks)")
    if cfg.cp > 1:
        require(not model.is_vit, "context parallel is for causal decoders; ViT sequences are 257 tokens")
        require(cfg.seq_len % (2 * cfg.cp) == 0,
                f"seq_len {cfg.seq_len} must be divisible by 2*cp = {2 * cfg.cp} (load-balanced causal chunks)")
    require(cfg.seq_len <= model.max_seq_len or not model.learned_positions,
            f"seq_len {cfg.seq_len} exceeds the {model.max_seq_len} learned positions of {model.name}")
    if cfg.vpp > 1:
        require(cfg.schedule == "interleaved", f"vpp {cfg.vpp} > 1 needs schedule 'interleaved', got '{cfg.schedule}'")
    if cfg.schedule == "interleaved":
        require(cfg.pp > 1 and cfg.vpp > 1, "the interleaved schedule needs pp > 1 and vpp > 1")
    require(model.num_layers >= cfg.pp * cfg.vpp,
            f"{model.name} has {model.num_layers} layers, fewer than pp*vpp = {cfg.pp * cfg.vpp} pipeline chunks")
    if cfg.layer_split:
        require(len(cfg.layer_split) == cfg.pp, f"layer_split has {len(cfg.layer_split)} entries, expected pp = {cfg.pp}")
        require(all(n >= 1 for n in cfg.layer_split), f"layer_split {list(cfg.layer_split)}: every stage needs >= 1 layer")
        require(sum(cfg.layer_split) == model.num_layers,
                f"layer_split {list(cfg.layer_split)} sums to {sum(cfg.layer_split)}, but {model.name} has {model.num_layers} layers")
    if cfg.vpp > 1:
        per = cfg.layers_per_stage(model.num_layers)
        require(all(n % cfg.vpp == 0 for n in per),
                f"layers per pipeline rank {list(per)} must each be divisible by vpp {cfg.vpp}")
    per_step = cfg.micro_batch_size * cfg.dp
    require(cfg.global_batch_size % per_step == 0,
            f"global batch {cfg.global_batch_size} is not divisible by micro_batch*dp = {cfg.micro_batch_size}*{cfg.dp} = {per_step}")
    if cfg.schedule == "interleaved":
        require(cfg.num_microbatches % cfg.pp == 0,
                f"interleaved schedule needs the {cfg.num_microbatches} micro-batches to be a multiple of pp {cfg.pp}")


def with_changes(cfg: ParallelConfig, **changes) -> ParallelConfig:
    return replace(cfg, **changes)


__all__ = ["ParallelConfig", "config_from_dict", "validate_config", "with_changes", "SCHEDULES", "RECOMPUTE", "DistplanError"]
