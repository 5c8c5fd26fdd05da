"""Whether a profile applies to a job: the one rule estimate, solve, run and the benchmarks apply.

A profile's layer fits are times of one layer of the model it measured, at its sequence length. A job of
another shape (hidden size, heads, KV heads, FFN width, vocabulary, experts, image and patch sizes) or
another sequence length does other work per layer: gpt2-xl's block does ~4.3x gpt2's, so gpt2's fits priced
gpt2-xl's forward at 3.0x gpt2's, the layer ratio alone (issue 22). So `profile_for_job`:
  - same shape and sequence length: the profile as it is;
  - otherwise a DistplanError naming both shapes, or with `fallback` (the CLI's --profile-fallback) the
    profile without its model-specific measurements (`without_model_specific`): every compute fit (the
    megatron layer and head among them), the stack factor and the sharding / TP / DDP per-block fits go, and
    the matmul sweep, copy bandwidth, collectives, host link, optimizer rates per parameter and the
    pipeline's per-operation costs (per byte sent) stay; the prediction's sources say which is which.
The number of layers is not part of the shape: a fit is per layer.
"""

from __future__ import annotations

from dataclasses import replace

from planner.errors import DistplanError
from planner.model import ModelSpec
from planner.profile import Profile

SHAPE_KEYS = ("family", "hidden_size", "num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size",
              "num_experts", "top_k")
VIT_SHAPE_KEYS = ("image_size", "patch_size", "num_channels")  # recorded for the vit family only
FALLBACK_FLAG = "--profile-fallback"


def model_shape(model: ModelSpec) -> tuple[tuple[str, object], ...]:
    """What decides the work of one layer of `model` (Profile.model_shape's form): SHAPE_KEYS, and for ViT
    VIT_SHAPE_KEYS."""
    keys = SHAPE_KEYS + (VIT_SHAPE_KEYS if model.is_vit else ())
    return tuple((k, getattr(model, k)) for k in keys)


def describe(name: str, shape: tuple, seq_len: int, dtype: str | None = None) -> str:
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


def describe_profile(profile: Profile) -> str:
    """The profile's own shape in words."""
    return describe(profile.model, profile.model_shape, profile.seq_len, profile.dtype)


def mismatch(profile: Profile, model: ModelSpec, seq_len: int) -> str | None:
    """Why `profile`'s model-specific measurements do not apply to `model` at `seq_len`, or None where they do
    (or where the profile no longer holds any: without_model_specific)."""
    shape = model_shape(model)
    if profile.model_specific_dropped or (profile.model_shape == shape and profile.seq_len == seq_len):
        return None
    job = describe(model.name, shape, seq_len)
    if not profile.model_shape:
        return (f"measured {profile.model} at seq {profile.seq_len} without recording its shape (written before "
                f"profiles did, and '{profile.model}' is not a zoo model); the job is {job}")
    return f"measured {describe_profile(profile)}; the job is {job}"


def profile_for_job(profile: Profile | None, model: ModelSpec, seq_len: int, *, fallback: bool = False,
                    source: str = "") -> Profile | None:
    """The profile to price `model` at `seq_len` with (see the module docstring); `source`: the file, for the error."""
    if profile is None:
        return None
    why = mismatch(profile, model, seq_len)
    if why is None:
        return profile
    if not fallback:
        same_shape = profile.model_shape == model_shape(model)
        hint = f"profile it at --seq-len {seq_len}" if same_shape else "profile this model"
        raise DistplanError(f"profile {source + ' ' if source else ''}{why}: {hint}, or pass {FALLBACK_FLAG} to "
                            "price its layers from the preset")
    return without_model_specific(profile)


def without_model_specific(profile: Profile) -> Profile:
    """`profile` less what it measured of its model's layers: compute fits of every kind, the stack factor and
    the per-block sharding, DDP and TP fits (with the raw points they derive from). Kept: the matmul sweep, copy
    and host bandwidth, collectives (fits and raw points), the optimizer rates per parameter, the overlap
    slowdown, memory and device count, and the pipeline's per-operation costs (per byte sent)."""
    raw = profile.raw if isinstance(profile.raw, dict) else {}
    comm = raw.get("communication") if isinstance(raw.get("communication"), dict) else {}
    kept = {k: v for k, v in comm.items() if k in ("points", "pipeline", "overlap", "inter_node", "unmeasured")}
    return replace(profile, compute=(), sharding=(), model_specific_dropped=True,
                   raw={"communication": kept, **({"ceilings": raw["ceilings"]} if "ceilings" in raw else {})})


def dropped_note(profile: Profile) -> str:
    """The sources' line for a profile whose model-specific measurements were dropped."""
    return (f"preset: compute fits, stack factor, sharding/DDP/TP per-block fits and megatron layer/head (profile "
            f"measured {describe_profile(profile)}); profile: matmul sweep, copy and host bandwidth, collectives, optimizer "
            "rate, pipeline per-operation costs")
