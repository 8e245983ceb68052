"""The one outage type: a span in which a camera delivered no frames.

The camera worker creates it, the store keeps it in Redis and the prompt states it in words, so it
lives here, in the layer every other one may import.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True, slots=True)
class Outage:
    """A span in which a camera delivered no frames. Times are UTC epoch seconds."""

    camera: str
    start_s: float
    end_s: float | None  # None while the camera is still offline
    reason: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Outage:
        return cls(**json.loads(text))
