"""Model specifications: the zoo, Hugging Face config.json files (planner.core.hf_config) and zoo-format YAML.

A `ModelSpec` is the shape of a transformer (decoder LLM, MoE LLM or ViT encoder). Everything
downstream (the torch module on the meta device, the layer graph, the cost model) is derived from it.

Analytic counts here follow the published formulas:
- parameters: Narayanan et al. SC'21, eq. for P = 12*l*h^2*(1 + 13/(12h) + (V+s)/(12*l*h)) for GPT;
  for other families the same sum of weight shapes, written out per tensor below.
- FLOPs: 2 FLOPs per multiply-accumulate of every matmul (Kaplan et al. 2020; SC'21 appendix).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from importlib import resources
from pathlib import Path

from planner.core.errors import DistplanError, require
from planner.core.fields import NAME, NAME_RULE, check_integer, flag, is_number, short, text
from planner.core.fileio import parse_yaml, read_json, read_yaml
from planner.core.hf_config import hf_fields

FAMILIES = ("gpt", "llama", "mixtral", "vit")  # model families distplan builds (planner/build/modeling.py)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a transformer. Units: counts of elements; lengths in tokens."""

    name: str
    family: str  # one of FAMILIES: decides norm, MLP, position encoding and heads
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int  # per expert for MoE models
    num_heads: int
    num_kv_heads: int  # grouped-query attention; == num_heads for multi-head attention
    vocab_size: int  # for ViT: number of classes of the classification head
    max_seq_len: int  # context length (learned positions for gpt/vit)
    num_experts: int = 1  # > 1 makes every block's MLP a mixture of experts
    top_k: int = 1  # experts each token is routed to
    default_seq_len: int = 0  # 0 -> max_seq_len (capped at 8192 for long-context models)
    default_global_batch: int = 512  # sequences per optimizer step
    image_size: int = 0  # ViT only
    patch_size: int = 0  # ViT only
    num_channels: int = 3  # ViT only
    tie_embeddings: bool = False
    # dropout probability of the training recipe (attention and hidden). 0 by default: current pre-training
    # recipes use none, and neither do distplan's runners (planner/build/modeling.py); Megatron's SC'21 GPT runs
    # used 0.1 (planner/core/published.py). Decides the dropout masks in the memory and time models.
    dropout: float = 0.0
    # q/k/v projections with a bias in a family whose other linears have none (Qwen2); gpt/vit have all biases anyway.
    # Adds h + 2*kv_dim parameters per block and changes no GEMM shape (torch's addmm adds the bias in the GEMM).
    qkv_bias: bool = False

    # ---- derived shapes -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        """Width of the K (and of the V) projection output."""
        return self.num_kv_heads * self.head_dim

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU MLP (gate, up, down) for llama/mixtral; GeLU MLP (fc1, fc2) for gpt/vit."""
        return self.family in ("llama", "mixtral")

    @property
    def uses_bias(self) -> bool:
        return self.family in ("gpt", "vit")

    @property
    def qkv_biased(self) -> bool:
        """Whether the q, k and v projections carry a bias (o_proj does when `uses_bias`)."""
        return self.uses_bias or self.qkv_bias

    @property
    def learned_positions(self) -> bool:
        return self.family in ("gpt", "vit")

    @property
    def is_vit(self) -> bool:
        return self.family == "vit"

    @property
    def seq_len(self) -> int:
        """Default training sequence length (tokens per sample; patches+1 for ViT)."""
        if self.is_vit:
            return (self.image_size // self.patch_size) ** 2 + 1
        if self.default_seq_len:
            return self.default_seq_len
        return min(self.max_seq_len, 8192)

    # ---- analytic parameter counts ----------------------------------------------------------
    def block_params(self) -> int:
        """Parameters of one transformer block (attention + MLP or MoE + norms)."""
        h, f = self.hidden_size, self.ffn_hidden_size
        attn = h * (h + 2 * self.kv_dim) + h * h  # QKV and output projections
        if self.qkv_biased:
            attn += h + 2 * self.kv_dim
        if self.uses_bias:
            attn += h  # o_proj
        if self.gated_mlp:
            mlp_one = 3 * h * f  # gate, up, down
        else:
            mlp_one = 2 * h * f + (f + h if self.uses_bias else 0)
        mlp = self.num_experts * mlp_one + (h * self.num_experts if self.is_moe else 0)  # + router
        norms = 2 * (2 * h if self.family in ("gpt", "vit") else h)  # LayerNorm has a bias
        return attn + mlp + norms

    def modules_with_params_per_block(self) -> int:
        """nn.Modules holding parameters in one block of planner/build/modeling.py: two norms, q/k/v/o projections,
        the MLP's two or three projections (MoE: the router and each expert's)."""
        mlp = 3 if self.gated_mlp else 2
        return 2 + 4 + (1 + self.num_experts * mlp if self.is_moe else mlp)

    def expert_params_per_block(self) -> int:
        """Parameters of the experts of one block (the part expert parallelism shards)."""
        if not self.is_moe:
            return 0
        return self.num_experts * 3 * self.hidden_size * self.ffn_hidden_size

    def embedding_params(self) -> int:
        """Input embedding (tokens, or patch projection + class token) and learned positions."""
        h = self.hidden_size
        if self.is_vit:
            return self.num_channels * self.patch_size**2 * h + h + h + self.seq_len * h
        pos = self.max_seq_len * h if self.learned_positions else 0
        return self.vocab_size * h + pos

    def head_params(self) -> int:
        """Final norm and output head (LM head, or classifier for ViT); 0 for a tied LM head."""
        h = self.hidden_size
        norm = 2 * h if self.family in ("gpt", "vit") else h
        if self.is_vit:
            return norm + h * self.vocab_size + self.vocab_size
        return norm + (0 if self.tie_embeddings else self.vocab_size * h)

    def total_params(self) -> int:
        return self.embedding_params() + self.num_layers * self.block_params() + self.head_params()

    def active_params(self) -> int:
        """Parameters used per token (MoE: only top_k experts)."""
        inactive = (self.num_experts - self.top_k) * self.expert_params_per_block() // max(self.num_experts, 1)
        return self.total_params() - self.num_layers * inactive

    # ---- analytic FLOPs ----------------------------------------------------------------------
    def block_matmul_flops_per_token(self, seq_len: int) -> dict[str, float]:
        """Forward matmul FLOPs per token of one block, by operator (2 FLOPs per MAC).

        `attn_core` is QK^T and softmax*V over the full sequence, as counted by SC'21 (causal masking
        does not halve it there). Dense and MoE blocks differ in `mlp` (top_k experts) and `router`.
        """
        h, f = self.hidden_size, self.ffn_hidden_size
        mlp_one = (3 if self.gated_mlp else 2) * 2 * h * f
        out = {
            "qkv": 2.0 * h * (h + 2 * self.kv_dim),
            "attn_core": 2.0 * 2 * seq_len * h,
            "attn_out": 2.0 * h * h,
            "mlp": float(self.top_k * mlp_one),
        }
        if self.is_moe:
            out["router"] = 2.0 * h * self.num_experts
        return out

    def head_matmul_flops_per_token(self) -> float:
        """LM head (or ViT classifier: counted per token for simplicity of the formula)."""
        return 2.0 * self.hidden_size * self.vocab_size

    def training_flops(self, global_batch: int, seq_len: int, recompute_forward: bool = False) -> float:
        """Model FLOPs of one iteration: forward + backward (2x forward) [+ recompute forward].

        For GPT this is SC'21's 72*B*s*l*h^2*(1 + s/(6h) + V/(12*l*h)) without recompute and
        96*B*s*l*h^2*(1 + s/(6h) + V/(16*l*h)) with full recompute (the head is not recomputed).
        """
        tokens = global_batch * seq_len
        block = sum(self.block_matmul_flops_per_token(seq_len).values()) * self.num_layers
        head = self.head_matmul_flops_per_token()
        passes = 4 if recompute_forward else 3
        return tokens * (passes * block + 3 * head)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("dropout", "qkv_bias"):
            if not d[key]:
                del d[key]  # the default: plan files and goldens written before the field stay identical
        return {"version": 1, **d}


# ---- loading --------------------------------------------------------------------------------

_REQUIRED = ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_seq_len")  # keys every model file must give
# (smallest, largest) of each integer field: the largest are 10x-100x the largest published models (Llama-3.1-405B:
# 126 layers, hidden 16384, FFN 53248, 128 heads, vocabulary 128256, 128k context; Megatron's 1T GPT: hidden 25600),
# so that no loop or traced tensor over a model's numbers runs away
BOUNDS = {"num_layers": (1, 2**12), "hidden_size": (1, 2**18), "ffn_hidden_size": (1, 2**20), "num_heads": (1, 2**12),
          "num_kv_heads": (1, 2**12), "vocab_size": (1, 2**24), "max_seq_len": (1, 2**24), "num_experts": (1, 2**12),
          "top_k": (1, 2**12), "default_seq_len": (0, 2**24), "default_global_batch": (1, 2**20),
          "image_size": (0, 2**16), "patch_size": (0, 2**16), "num_channels": (1, 2**10)}


def _validate(spec: ModelSpec) -> ModelSpec:
    require(isinstance(spec.name, str) and NAME.fullmatch(spec.name) is not None,
            f"model name {short(spec.name)} must be {NAME_RULE}")
    require(spec.family in FAMILIES, f"model '{spec.name}': family '{spec.family}' is unknown; valid: {', '.join(FAMILIES)}")
    for key, (low, high) in BOUNDS.items():
        value = getattr(spec, key)
        require(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
                f"model '{spec.name}': {key} must be an integer from {low} to {high}, got {value!r}")
    require(spec.hidden_size % spec.num_heads == 0,
            f"model '{spec.name}': hidden_size {spec.hidden_size} is not divisible by num_heads {spec.num_heads}")
    require(spec.num_heads % spec.num_kv_heads == 0,
            f"model '{spec.name}': num_heads {spec.num_heads} is not divisible by num_kv_heads {spec.num_kv_heads}")
    require(1 <= spec.top_k <= spec.num_experts,
            f"model '{spec.name}': top_k {spec.top_k} must be between 1 and num_experts {spec.num_experts}")
    if spec.is_vit:
        require(spec.patch_size > 0 and spec.image_size > 0 and spec.image_size % spec.patch_size == 0,
                f"model '{spec.name}': image_size {spec.image_size} must be a positive multiple of patch_size {spec.patch_size}")
        require(spec.seq_len <= spec.max_seq_len, f"model '{spec.name}': {spec.seq_len} patches + 1 exceed max_seq_len "
                f"{spec.max_seq_len}")
    return spec


def spec_from_dict(data: dict, name: str, source: str) -> ModelSpec:
    """Build a ModelSpec from the zoo YAML format (keys are ModelSpec field names)."""
    if not isinstance(data, dict):
        raise DistplanError(f"{source}: expected a mapping of model fields, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != "version"}
    valid = {f.name for f in fields(ModelSpec)}
    unknown = sorted(map(str, set(data) - valid))
    require(not unknown, f"{source}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(valid))}")
    data.setdefault("name", name)
    for key in _REQUIRED:
        require(key in data, f"{source}: missing key '{key}'")
    types = {f.name: f.type for f in fields(ModelSpec)}
    for key, value in data.items():
        if types[key] == "int":
            check_integer(value, key, source)
        elif types[key] == "bool":
            flag(data, key, source)
        elif types[key] == "str":
            text(data, key, source)
        elif types[key] == "float":
            require(is_number(value) and 0 <= value < 1, f"{source}: '{key}' must be a number in [0, 1), got {short(value)}")
    data.setdefault("family", "gpt")
    data.setdefault("num_kv_heads", data["num_heads"])
    data.setdefault("ffn_hidden_size", 4 * data["hidden_size"])
    return _validate(ModelSpec(**data))


def spec_from_hf_config(cfg: object, name: str, source: str) -> ModelSpec:
    """Build a ModelSpec from a Hugging Face config.json (the model_types of planner.core.hf_config.SUPPORTED)."""
    return _validate(ModelSpec(name=name, **hf_fields(cfg, source)))


def zoo_names() -> list[str]:
    root = resources.files("configs") / "models"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_model(name_or_path: str) -> ModelSpec:
    """A zoo name (see configs/models/), a Hugging Face config.json, or a zoo-format YAML file."""
    if name_or_path in zoo_names():
        source = f"zoo model '{name_or_path}'"
        zoo = (resources.files("configs") / "models" / f"{name_or_path}.yaml").read_text()
        return spec_from_dict(parse_yaml(zoo, source), name_or_path, source)
    path = Path(name_or_path)
    zoo = f"zoo models: {', '.join(zoo_names())}"
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise DistplanError(f"unknown model '{name_or_path}': not a zoo name nor an existing .json/.yaml file; {zoo}")
    name = path.parent.name if path.name == "config.json" else path.stem
    hint = f" (nor is it a zoo name; {zoo})"
    if path.suffix == ".json":
        return spec_from_hf_config(read_json(path, "model file", hint), name, str(path))
    return spec_from_dict(read_yaml(path, "model file", hint), name, str(path))


def with_layers(spec: ModelSpec, num_layers: int) -> ModelSpec:
    """The same model with another layer count (reduced-layer variants for single-GPU runs)."""
    require(num_layers > 0, f"num_layers must be positive, got {num_layers}")
    return replace(spec, name=f"{spec.name}-{num_layers}l", num_layers=num_layers)


# ---- the shape of one layer (what a profile's layer fits are measured for) ----------------------------

# what a profile's layer fits depend on (profiled.mismatch compares them)
SHAPE_KEYS = ("family", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
              "num_experts", "top_k")
VIT_SHAPE_KEYS = ("image_size", "patch_size", "num_channels")  # recorded for the vit family only

def model_shape(model: ModelSpec) -> tuple[tuple[str, object], ...]:
    """What decides the work of one layer of `model` (Profile.model_shape's form): SHAPE_KEYS, and for ViT
    VIT_SHAPE_KEYS."""
    keys = SHAPE_KEYS + (VIT_SHAPE_KEYS if model.is_vit else ())
    return tuple((k, getattr(model, k)) for k in keys)


def describe_shape(name: str, shape: tuple, seq_len: int, dtype: str | None = None) -> str:
    """'gpt2 (gpt, hidden 768, heads 12/12, ffn 3072, vocab 50257, seq 1024, bf16)'; heads: query/key-value."""
    if not shape:
        return f"{name} (shape not recorded, seq {seq_len}{f', {dtype}' if dtype else ''})"
    s = dict(shape)
    parts = [str(s["family"]), f"hidden {s['hidden_size']}", f"heads {s['num_heads']}/{s['num_kv_heads']}",
             f"ffn {s['ffn_hidden_size']}", f"vocab {s['vocab_size']}"]
    if s.get("num_experts", 1) > 1:
        parts.append(f"experts {s['num_experts']} top-{s['top_k']}")
    if "image_size" in s:
        parts.append(f"image {s['image_size']} patch {s['patch_size']} channels {s['num_channels']}")
    parts.append(f"seq {seq_len}")
    if dtype:
        parts.append(dtype)
    return f"{name} ({', '.join(parts)})"
