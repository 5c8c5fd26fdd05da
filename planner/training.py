"""Training time and cost of a plan: `--train-tokens 2e12 [--gpu-hour-price 2.5]` on solve, estimate and show.

days = train_tokens / tokens_per_s / 86400; GPU-hours = gpus x days x 24; cost = GPU-hours x price per GPU-hour.
Pure arithmetic over the prediction's throughput (which is itself measured, validated or preset-priced: the plan's
`sources` say which); the result says it assumes every step runs at the predicted speed, with no restarts.
"""

from __future__ import annotations

import math

from planner.core.errors import DistplanError, require

MAX_TRAIN_TOKENS = 1e17  # 50x the largest published pre-training run (Llama 3 405B: 15.6e12 tokens); above is a typo
MAX_GPU_HOUR_PRICE = 1e4  # price per GPU-hour (any currency); above is a typo of a per-node or per-month price


def check_training_inputs(train_tokens: float | None, gpu_hour_price: float | None) -> None:
    """DistplanError naming the bad value of --train-tokens / --gpu-hour-price."""
    if train_tokens is not None:
        require(isinstance(train_tokens, (int, float)) and math.isfinite(train_tokens)
                and 0 < train_tokens <= MAX_TRAIN_TOKENS,
                f"--train-tokens {train_tokens!r} must be a number of tokens in (0, {MAX_TRAIN_TOKENS:g}], e.g. 2e12")
    if gpu_hour_price is not None:
        require(train_tokens is not None, "--gpu-hour-price needs --train-tokens (the tokens the cost is for)")
        require(isinstance(gpu_hour_price, (int, float)) and math.isfinite(gpu_hour_price)
                and 0 <= gpu_hour_price <= MAX_GPU_HOUR_PRICE,
                f"--gpu-hour-price {gpu_hour_price!r} must be a price per GPU-hour in [0, {MAX_GPU_HOUR_PRICE:g}], "
                "e.g. 2.5")


def training_estimate(tokens_per_s: float, gpus: int, train_tokens: float, gpu_hour_price: float | None = None) -> dict:
    """{train_tokens, days, gpu_hours[, gpu_hour_price, cost]} of training `train_tokens` at `tokens_per_s`."""
    check_training_inputs(train_tokens, gpu_hour_price)
    if not (tokens_per_s > 0 and math.isfinite(tokens_per_s)):
        raise DistplanError(f"the plan's throughput {tokens_per_s!r} tokens/s is not positive: no training time")
    seconds = train_tokens / tokens_per_s
    out = {"train_tokens": float(train_tokens), "days": seconds / 86400, "gpu_hours": gpus * seconds / 3600}
    if gpu_hour_price is not None:
        out.update(gpu_hour_price=float(gpu_hour_price), cost=out["gpu_hours"] * gpu_hour_price)
    return out


def training_line(est: dict) -> str:
    """One line for tables: '2.0e12 tokens: 41.3 days, 63,400 GPU-hours, 158,500 at 2.5 per GPU-hour'."""
    text = f"{est['train_tokens']:.3g} tokens: {est['days']:,.1f} days, {est['gpu_hours']:,.0f} GPU-hours"
    if "cost" in est:
        text += f", cost {est['cost']:,.0f} at {est['gpu_hour_price']:g} per GPU-hour"
    return text + " (every step at the predicted speed, no restarts)"
