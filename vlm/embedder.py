"""Retrieval embedder: SigLIP image and text towers in one aligned space.

Frames and questions are embedded by the two towers of one SigLIP checkpoint (default
``google/siglip-base-patch16-224``) and L2-normalised, so an inner product (FAISS ``IndexFlatIP``)
is their cosine similarity. SigLIP's text tower was trained on text padded to ``max_length``
(64 tokens) without an attention mask, so questions are padded the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedModel, SiglipModel

from vlm.models import (
    load_config,
    load_pretrained,
    not_found_error,
    resolve_device,
    resolve_dtype,
    resolve_file,
    tokenizer_import_error,
)
from vlm.preprocess import PixelSpec, read_preprocessor_config, to_pixels

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "google/siglip-base-patch16-224"

# One dict chooses the implementation from config.model_type.
EMBEDDERS: dict[str, type[PreTrainedModel]] = {"siglip": SiglipModel}


class Embedder:
    """Embeds frames and texts into one L2-normalised space of ``dim`` float32 values."""

    def __init__(
        self, name: str, model: PreTrainedModel, tokenizer: Any, preprocessor: dict[str, Any]
    ) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        side = int(vision.image_size)
        self._spec = PixelSpec.from_config(preprocessor, side, side)
        self._text_length = int(model.config.text_config.max_position_embeddings)
        self._dim = int(vision.hidden_size)

    @property
    def dim(self) -> int:
        """D: width of every embedding."""
        return self._dim

    @property
    def device(self) -> torch.device:
        return self.model.device

    def preprocess(self, frames: np.ndarray) -> Tensor:
        """frames [T, H, W, 3] uint8 RGB → pixels [T, 3, S, S] float32."""
        return to_pixels(frames, self._spec)

    @torch.inference_mode()
    def embed_pixels(self, pixels: Tensor) -> np.ndarray:
        """pixels [T, 3, S, S] from ``preprocess`` → [T, D] float32, L2-normalised."""
        if pixels.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.get_image_features(
            pixel_values=pixels.to(self.device, self.model.dtype), return_dict=True
        )
        return _normalised(out.pooler_output)

    def embed_images(self, frames: np.ndarray) -> np.ndarray:
        """frames [T, H, W, 3] uint8 RGB → [T, D] float32, L2-normalised."""
        return self.embed_pixels(self.preprocess(frames))

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """texts (B of them) → [B, D] float32, L2-normalised."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self._text_length, return_tensors="pt"
        )
        out = self.model.get_text_features(input_ids=batch["input_ids"].to(self.device), return_dict=True)
        return _normalised(out.pooler_output)


def _normalised(features: Tensor) -> np.ndarray:
    """[B, D] any dtype → [B, D] float32 numpy with unit rows."""
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def load_embedder(name_or_dir: str, device: str = "auto", dtype: str = "auto") -> Embedder:
    """Load a SigLIP checkpoint (hub id or local ``save_pretrained`` directory)."""
    setting = "models.embedder"
    config = load_config(name_or_dir, setting)
    try:
        model_class = EMBEDDERS[config.model_type]
    except KeyError:
        raise ValueError(
            f"{name_or_dir!r} is a {config.model_type!r} model; "
            f"the embedder supports {', '.join(sorted(EMBEDDERS))}"
        ) from None
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    local = Path(name_or_dir).expanduser()
    source = str(local) if local.is_dir() else name_or_dir
    try:
        model = load_pretrained(model_class, source, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise not_found_error(name_or_dir, setting, exc) from exc
    except ImportError as exc:
        # Google's SigLIP checkpoints ship a SentencePiece tokenizer (spiece.model).
        raise tokenizer_import_error(name_or_dir, setting, exc) from exc
    model = model.to(torch_device).eval()
    preprocessor = read_preprocessor_config(resolve_file(source, "preprocessor_config.json", setting))
    embedder = Embedder(name_or_dir, model, tokenizer, preprocessor)
    logger.info(
        "loaded embedder %s on %s as %s: dim %d", name_or_dir, torch_device, torch_dtype, embedder.dim
    )
    return embedder
