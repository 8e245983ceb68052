"""Types shared by the model layer and its callers: vision-path output and prompt parts.

Kept apart from `vlm.models` so that assembling a prompt or answering over MQTT does not import
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class VisualTokens:
    """Output of the vision path for T frames."""

    tokens: Tensor  # [T, N, C] LLM input-space tokens (vision tower + projector), float32 CPU
    global_feats: Tensor  # [T, G] mean of the vision tower's patch features, L2-normalised
    grid: tuple[int, int]  # (rows, cols), rows * cols == N


@dataclass
class TextPart:
    """Text inside the user turn."""

    text: str


@dataclass
class VisualPart:
    """Visual tokens inside the user turn, with the provenance that fixes their positions."""

    tokens: Tensor  # [M, C]
    frame: Tensor  # [M] int32 anchor frame index (chunk-local, for 3-D positions)
    row: Tensor  # [M] int16 grid row (-1: a summary token without a place)
    col: Tensor  # [M] int16 grid column (-1: a summary token without a place)

    def __post_init__(self) -> None:
        m = self.tokens.shape[0]
        if self.tokens.ndim != 2:
            raise ValueError(f"VisualPart.tokens must be [M, C], got {list(self.tokens.shape)}")
        for name in ("frame", "row", "col"):
            value: Tensor = getattr(self, name)
            if value.shape != (m,):
                raise ValueError(f"VisualPart.{name} must be [{m}], got {list(value.shape)}")


PromptPart = TextPart | VisualPart
