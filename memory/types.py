"""Types that cross module boundaries: what one compressed chunk of memory holds.

See docs/architecture.md (memory/) and docs/compression.md for how the fields are filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch
from torch import Tensor


class TokenKind(IntEnum):
    """Why a memory token exists (stored as int8)."""

    FULL = 0  # an encoder token kept as it was: the chunk fitted in its budget
    SALIENT = 1  # a changed token kept verbatim because it was the most novel in its segment
    CONTEXT = 2  # a density-peak centre that absorbed similar tokens by size-weighted merging
    STATIC = 3  # a run of unchanged tokens of one grid cell (several frames, or carried from the last chunk)
    SUMMARY = 4  # the chunk's count-weighted mean token, placed last in prompts (LLaVA-MLB's tail)


# dtype of every provenance array, in one place so the codec and the checks agree.
PROVENANCE_DTYPES: dict[str, torch.dtype] = {
    "t_first": torch.float64,
    "t_last": torch.float64,
    "frame": torch.int32,
    "row": torch.int16,
    "col": torch.int16,
    "count": torch.int32,
    "kind": torch.int8,
    "segment": torch.int16,
}


@dataclass
class CompressedChunk:
    """The memory tokens of one chunk and where each came from.

    Attributes:
        tokens: [M, C] LLM input-space features (float).
        t_first: [M] float64 UTC seconds: start of the span the token stands for.
        t_last: [M] float64 UTC seconds: end of that span.
        frame: [M] int32 index of the anchor frame inside the chunk (for positions).
        row: [M] int16 grid row (-1 for summary tokens).
        col: [M] int16 grid column (-1 for summary tokens).
        count: [M] int32 encoder tokens absorbed, counted in sampled frames (summary tokens: 0).
        kind: [M] int8 TokenKind.
        segment: [M] int16 temporal segment inside the chunk.
        grid: (rows, cols) of the encoder's token grid.
        n_input: tokens the encoder produced for this chunk.
    """

    tokens: Tensor
    t_first: Tensor
    t_last: Tensor
    frame: Tensor
    row: Tensor
    col: Tensor
    count: Tensor
    kind: Tensor
    segment: Tensor
    grid: tuple[int, int]
    n_input: int

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [M, C], got shape {tuple(self.tokens.shape)}")
        m = self.tokens.shape[0]
        for name, dtype in PROVENANCE_DTYPES.items():
            value: Tensor = getattr(self, name)
            if value.shape != (m,):
                raise ValueError(f"{name} must have shape ({m},) like tokens, got {tuple(value.shape)}")
            if value.dtype != dtype:
                raise ValueError(f"{name} must be {dtype}, got {value.dtype}")
        if len(self.grid) != 2 or min(self.grid) <= 0:
            raise ValueError(f"grid must be (rows, cols) > 0, got {self.grid}")
        if self.n_input < 0:
            raise ValueError(f"n_input must be >= 0, got {self.n_input}")

    @property
    def n_tokens(self) -> int:
        """M, the number of memory tokens."""
        return int(self.tokens.shape[0])
