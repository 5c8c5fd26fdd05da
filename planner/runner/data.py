"""Training data for `distplan run`: deterministic synthetic tokens, or a tokenized binary file.

The data contract (planner/runner/engine_api.py): step k consumes global batch k, `global_batch_size`
samples; data-parallel rank r takes, for its micro-batch j, samples [(j*dp + r)*mb, (j*dp + r + 1)*mb)
of it. Every engine and the single-process numerics reference read batches through `DataSource`, so
the same step sees the same tokens whatever the parallel layout.

- Synthetic (default): sample i of step k is drawn from a CPU generator seeded with (seed, k), uniform
  over the vocabulary; CPU draws make the tokens identical on every device.
- File (`--data PATH`): a flat array of uint16 or uint32 tokens (the nanoGPT / Megatron `.bin` layout,
  no header), read through a numpy memmap. Sample i of step k is the window of seq_len + 1 tokens
  starting at token ((k * global_batch + i) * seq_len) mod (usable tokens): consecutive, non-overlapping
  windows, wrapping around at the end of the file.
- ViT models get synthetic images (standard normal pixels) and class labels; files are for token models.

Decoders return (inputs [b, seq] int64, targets [b, seq] int64) with targets shifted by one token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from planner.core.errors import DistplanError, require
from planner.core.model import ModelSpec

DATA_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}  # token-file dtypes read (nanoGPT-style .bin files)
_STEP_STRIDE = 1_000_003  # prime: seeds of different (seed, step) pairs never collide for steps < stride


@dataclass(frozen=True)
class DataSource:
    """Global batches for a model: synthetic by default, or windows of a token file."""

    spec: ModelSpec
    seq_len: int
    global_batch_size: int
    seed: int = 1234
    path: str | None = None
    dtype: str = "uint16"

    def __post_init__(self):
        require(self.seq_len >= 1 and self.global_batch_size >= 1,
                f"data: seq_len and global_batch_size must be positive, got {self.seq_len} and {self.global_batch_size}")
        if self.path is not None:
            require(not self.spec.is_vit, f"--data {self.path}: token files are for language models; {self.spec.name} is a ViT")
            _open_tokens(self.path, self.dtype, self.seq_len)  # validate now, with a clear error

    @property
    def description(self) -> str:
        if self.path is not None:
            return f"file {self.path} ({self.dtype})"
        kind = "images" if self.spec.is_vit else "tokens"
        return f"synthetic {kind} (seed {self.seed})"

    def global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of optimizer step `step`, on the CPU."""
        if self.spec.is_vit:
            return self._images(step)
        if self.path is not None:
            tokens = self._file_windows(step)
        else:
            gen = torch.Generator().manual_seed(self.seed * _STEP_STRIDE + step)
            tokens = torch.randint(0, self.spec.vocab_size, (self.global_batch_size, self.seq_len + 1), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def _images(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * _STEP_STRIDE + step)
        s = self.spec
        images = torch.randn(self.global_batch_size, s.num_channels, s.image_size, s.image_size, generator=gen)
        labels = torch.randint(0, s.vocab_size, (self.global_batch_size,), generator=gen)
        return images, labels

    def _file_windows(self, step: int) -> torch.Tensor:
        tokens = _open_tokens(self.path, self.dtype, self.seq_len)
        windows = (len(tokens) - 1) // self.seq_len  # whole windows of seq_len + 1 tokens (the +1 overlaps)
        out = np.empty((self.global_batch_size, self.seq_len + 1), dtype=np.int64)
        for i in range(self.global_batch_size):
            start = ((step * self.global_batch_size + i) % windows) * self.seq_len
            out[i] = tokens[start:start + self.seq_len + 1]
        bad = out.max(initial=0)
        require(bad < self.spec.vocab_size,
                f"--data {self.path}: token id {bad} at step {step} is outside the vocabulary of {self.spec.name} "
                f"(vocab_size {self.spec.vocab_size}); was the file written with another tokenizer?")
        return torch.from_numpy(out)


def local_batch(inputs: torch.Tensor, targets: torch.Tensor, dp_rank: int, dp: int, micro_batch_size: int,
                num_microbatches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples data-parallel rank `dp_rank` trains on in one step, its micro-batches concatenated in order.

    Micro-batch j of rank r is samples [(j*dp + r)*mb, (j*dp + r + 1)*mb) of the global batch
    (engine_api data contract); the result's rows [j*mb, (j+1)*mb) are micro-batch j.
    """
    mb = micro_batch_size
    rows = [torch.arange((j * dp + dp_rank) * mb, (j * dp + dp_rank + 1) * mb) for j in range(num_microbatches)]
    index = torch.cat(rows)
    return inputs.index_select(0, index), targets.index_select(0, index)


def _open_tokens(path: str, dtype: str, seq_len: int) -> np.memmap:
    require(dtype in DATA_DTYPES, f"--data-dtype '{dtype}' is unknown; valid: {', '.join(DATA_DTYPES)}")
    p = Path(path)
    require(p.is_file(), f"--data '{path}' does not exist or is not a file (expected a flat binary of {dtype} tokens)")
    item = np.dtype(DATA_DTYPES[dtype]).itemsize
    size = p.stat().st_size
    require(size % item == 0, f"--data '{path}': {size} bytes is not a whole number of {dtype} tokens ({item} bytes each); "
                              f"is --data-dtype right?")
    require(size // item >= seq_len + 1,
            f"--data '{path}' holds {size // item} tokens, fewer than one sample of seq_len + 1 = {seq_len + 1}")
    try:
        return np.memmap(p, dtype=DATA_DTYPES[dtype], mode="r")
    except (OSError, ValueError) as exc:
        raise DistplanError(f"--data '{path}' cannot be read: {exc}") from None


def write_tokens(path: str | Path, tokens, dtype: str = "uint16") -> None:
    """Write a flat token file in the layout `--data` reads (for tests and examples)."""
    require(dtype in DATA_DTYPES, f"dtype '{dtype}' is unknown; valid: {', '.join(DATA_DTYPES)}")
    np.asarray(tokens, dtype=DATA_DTYPES[dtype]).tofile(str(path))
