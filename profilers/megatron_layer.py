"""Megatron-core's own transformer layer, timed as the megatron engine builds it (kind MEGATRON_BLOCK_KIND).

Why: the megatron engine runs megatron-core's local layer spec (no Transformer Engine): its own fused QKV
projection, DotProductAttention (unfused: baddbmm into a preallocated buffer, an in-place causal mask,
softmax, bmm) and MLP. The cost model had priced it as distplan's block (flash attention) plus the
measured difference of a stand-in unfused core (profilers/compute.UnfusedAttentionCore) and over-predicted
megatron's gpt2-xl steps by 22-25% on 2xH200 (benchmarks/results/campaign_2xh200.md): the stand-in cost
about 4.5 ms more per layer than megatron's own layer.

What: on CUDA, where megatron-core is installed, one GPTModel chunk without embedding or head
(pre_process = post_process = False) holding one layer, built from the same TransformerConfig keywords and
layer spec as the megatron engine (planner/build/megatron.py), in the profile's dtype, at tp = 1 (a tp > 1
layer needs tp ranks), timed forward and backward per micro-batch by profilers.compute.profile_layer
like every other kind. The input is set as a pipeline stage's would be (`set_input_tensor`, [s, b, h]).
A single-rank process group and megatron's parallel state are set up for it and torn down after.
Anything going wrong here is recorded in the result's "error" and the profile goes on without the kind.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from contextlib import contextmanager

import torch
from torch import nn

from planner.build.megatron import layer_config_kwargs, resolve_config, spec_model_kwargs
from planner.core.job import ParallelConfig
from planner.core.model import ModelSpec
from planner.core.profile import MEGATRON_BLOCK_KIND, MEGATRON_HEAD_KIND
from profilers import compute


def available(spec: ModelSpec, device: torch.device) -> str | None:
    """None when the megatron layer can be profiled here, else why not (recorded in the profile)."""
    if device.type != "cuda":
        return "megatron-core trains on CUDA only"
    if spec.is_vit or spec.is_moe:
        return f"{spec.name}: the megatron engine's dense decoder layer only (no ViT or MoE layer profiled)"
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        return "megatron-core is not installed"
    return None


def preload() -> None:
    """Import the megatron-core modules the layer needs (slow: seconds), ahead of `profile`; errors are left for
    `profile` to record."""
    try:
        import megatron.core.models.gpt  # noqa: F401
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel  # noqa: F401
        import megatron.core.transformer  # noqa: F401 - imported for its load time, not its names
    except Exception:  # noqa: BLE001 - profile() imports again and says why it failed
        pass


@contextmanager
def megatron_state(device: torch.device, seed: int = 0):
    """A single-rank process group (if none is up) and megatron's parallel state at tp = pp = 1."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    own_group = not dist.is_initialized()
    tmp = tempfile.mkdtemp(prefix="distplan-megatron-")
    if own_group:
        dist.init_process_group("nccl", init_method=f"file://{os.path.join(tmp, 'rendezvous')}", rank=0, world_size=1,
                                device_id=device)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                                     create_gloo_process_groups=False)
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
        yield
    finally:
        ps.destroy_model_parallel()
        if own_group:
            dist.destroy_process_group()


def _one_layer_chunk(spec: ModelSpec, device: torch.device, dtype: torch.dtype, post_process: bool) -> nn.Module:
    """A GPTModel chunk without embedding holding one layer, built from the same TransformerConfig keywords and
    layer spec as the megatron engine (tp = pp = 1, no recompute); with `post_process` its final norm, output layer
    (its own: a lone last stage has no embedding to share with; the matmul is the same) and loss too."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    kw = resolve_config(layer_config_kwargs(spec, ParallelConfig(flash_attention=False), name))
    kw["num_layers"] = 1
    fields = set(TransformerConfig.__dataclass_fields__)
    config = TransformerConfig(**{k: v for k, v in kw.items() if k in fields})
    layer_spec = get_gpt_layer_local_spec(normalization=config.normalization)
    model_kw = {**spec_model_kwargs(spec, 1), **({"share_embeddings_and_output_weights": False} if post_process else {})}
    return GPTModel(config=config, transformer_layer_spec=layer_spec, pre_process=False, post_process=post_process,
                    **model_kw).to(device=device, dtype=dtype)


class MegatronLayer(nn.Module):
    """One megatron-core layer as a middle pipeline stage: forward(x [s, b, h]) -> [s, b, h]."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.chunk = _one_layer_chunk(spec, device, dtype, post_process=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.chunk.set_input_tensor(x)
        return self.chunk(None, None, None)


class MegatronHead(nn.Module):
    """megatron-core's last pipeline stage holding one layer: forward(x [s, b, h], labels [b, s]) -> the mean of its
    per-token losses, as the megatron engine's loss function takes them (`_loss`). Its time less
    MEGATRON_BLOCK_KIND's is megatron's head (planner.cost.layer.megatron_head_s)."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.chunk = _one_layer_chunk(spec, device, dtype, post_process=True)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.chunk.set_input_tensor(x)
        return self.chunk(None, None, None, labels=labels).float().mean()


def build_layer(spec: ModelSpec, kind: str, tp: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """compute.build_layer for megatron-core's kinds (inside `megatron_state`; tp = 1 only)."""
    return {MEGATRON_BLOCK_KIND: MegatronLayer, MEGATRON_HEAD_KIND: MegatronHead}[kind](spec, device, dtype)


def profile(spec: ModelSpec, seq_len: int, device: torch.device, dtype: torch.dtype, settings, on_point) -> dict:
    """profilers.compute.profile_layer's result for MEGATRON_BLOCK_KIND at tp = 1, or one with no points and
    an "error" saying why it was not measured."""
    return _profile_kind(MEGATRON_BLOCK_KIND, "megatron layer", spec, seq_len, device, dtype, settings, on_point)


def profile_head(spec: ModelSpec, seq_len: int, device: torch.device, dtype: torch.dtype, settings, on_point) -> dict:
    """profilers.compute.profile_layer's result for MEGATRON_HEAD_KIND at tp = 1 (MegatronHead), or one with no
    points and an "error" saying why it was not measured. Why: megatron-core's plans ran 2.3-8.6% under predictions
    that charged distplan's measured head (unfused cross-entropy with fp32 copies), the more so the more
    micro-batches passed the head (benchmarks/results/megatron_head_2xh200.md)."""
    return _profile_kind(MEGATRON_HEAD_KIND, "megatron head", spec, seq_len, device, dtype, settings, on_point)


def _profile_kind(kind: str, what: str, spec: ModelSpec, seq_len: int, device: torch.device, dtype: torch.dtype,
                  settings, on_point) -> dict:
    """One megatron kind at tp = 1 inside megatron's parallel state; anything going wrong is the result's "error"
    (the profile goes on without the kind)."""
    why = available(spec, device)
    if why is not None:
        return {"kind": kind, "tp": 1, "points": [], "oom_micro_batch": 0, "error": why}
    try:
        with megatron_state(device):
            return compute.profile_layer(spec, kind, 1, seq_len, device, dtype, settings, on_point, build_fn=build_layer)
    except Exception as exc:  # noqa: BLE001 - the profile goes on without this kind, saying why
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return {"kind": kind, "tp": 1, "points": [], "oom_micro_batch": 0,
                "error": f"{what} not measured: {type(exc).__name__}: {first}"}
