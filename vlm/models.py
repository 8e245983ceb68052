"""Vision-language models: loading, the vision path (frames → LLM-space tokens) and generation.

``load_vlm`` loads a real checkpoint with ``from_pretrained`` from a hub id or a local directory
and picks the implementation from ``config.model_type`` through ``FAMILIES``. Two families:

* ``llava_onevision`` (default ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``): frames follow the
  model's VIDEO path, i.e. SigLIP tower → projector → 2x2 bilinear pooling, so one frame gives
  rows·cols = ceil(P/2)² tokens. The single newline token the model appends after a video is not
  part of a frame's tokens; generation appends it after every visual block, as the model does.
* ``qwen2_5_vl``: every frame is encoded as an image (repeated over the temporal patch) through
  the windowed ViT and the 2x2 patch merger, N = (S/14/2)² for frames resized to S x S.

Generation is transformers' greedy ``generate``, fed with ``inputs_embeds`` so that stored
(compressed) visual tokens can be spliced between text tokens, and with explicit ``position_ids``.
For Qwen2.5-VL the 3-D M-RoPE positions of each visual token come from its provenance (frame, row,
col), computed here for every call: the model's own ``rope_deltas`` attribute is never read or
written, so one model instance can serve the encoder thread and the generation thread at once.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import jinja2
import numpy as np
import torch
from torch import Tensor
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LlavaOnevisionForConditionalGeneration,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.generation import BaseStreamer, MaxTimeCriteria, StoppingCriteria, StoppingCriteriaList
from transformers.utils import cached_file

from vlm.preprocess import (
    PixelSpec,
    qwen_frame_side,
    qwen_patchify,
    read_preprocessor_config,
    to_pixels,
)
from vlm.types import PromptPart, TextPart, VisualPart, VisualTokens

logger = logging.getLogger(__name__)

Family = Literal["llava_onevision", "qwen2_5_vl"]

DEFAULT_VLM = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"
# Qwen's default system prompt; both families were instruction-tuned with a system turn.
SYSTEM_PROMPT = "You are a helpful assistant."
# Qwen2.5-VL accepts any size; 448 px squares give 16x16 = 256 tokens per frame, close to
# LLaVA-OneVision's 14x14 = 196 pooled video tokens, a budget a 7B LM can still attend over.
QWEN_TARGET_SIDE = 448
# Characters of a decoded prefix that may still change when the next byte-level token arrives.
_INCOMPLETE_UTF8 = "\ufffd"


# --------------------------------------------------------------------------- errors, device, dtype


class ModelNotFoundError(RuntimeError):
    """A model id or directory could not be loaded; the message says what was tried and what to do."""


class UnsupportedModelError(ValueError):
    """The checkpoint's ``model_type`` is not one vigil implements."""


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("models.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'")
    return torch.device(device)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → bfloat16 on GPU (float16 where bf16 is unsupported), float32 on CPU."""
    if dtype != "auto":
        try:
            return _DTYPES[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def not_found_error(name: str, setting: str, cause: BaseException) -> ModelNotFoundError:
    local = Path(name).expanduser()
    looks_local = name.startswith(("/", "./", "../", "~")) or local.exists()
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    kind = "a local directory" if looks_local else "a hub id"
    state = "does not exist" if looks_local and not local.exists() else "could not be loaded"
    return ModelNotFoundError(
        f"model {name!r} ({kind}) {state}: {cause}. HF_HUB_OFFLINE is {'set' if offline else 'not set'}. "
        f"To run without network, set {setting} to a directory holding a save_pretrained copy, "
        f"downloaded on a machine with network, e.g. `huggingface-cli download {name} --local-dir DIR`."
    )


def load_config(name: str, setting: str) -> PretrainedConfig:
    """``AutoConfig.from_pretrained`` with ModelNotFoundError instead of a bare OSError."""
    local = Path(name).expanduser()
    if local.is_dir():
        name = str(local)
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise not_found_error(name, setting, exc) from exc


def resolve_file(name: str, filename: str, setting: str) -> str:
    """Local path of one file of a checkpoint (a hub id resolved through the HF cache)."""
    local = Path(name).expanduser()
    try:
        path = cached_file(str(local) if local.is_dir() else name, filename)
    except (OSError, ValueError) as exc:
        raise not_found_error(name, setting, exc) from exc
    if path is None:
        raise not_found_error(name, setting, FileNotFoundError(filename))
    return path


# Packages transformers' tokenizer classes import only when a checkpoint needs them (import name →
# pip name): SentencePiece tokenizers (SigLIP's) need both; both are vigil dependencies.
TOKENIZER_PACKAGES = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package, or a module blocked in sys.modules
        return False


def tokenizer_import_error(name: str, setting: str, cause: ImportError) -> ModelNotFoundError:
    """The tokenizer of ``name`` needs a package that is not installed: say which, and how to get it.

    transformers raises a bare ImportError ("SiglipTokenizer requires the protobuf library ...");
    the packages that are really missing here are looked up rather than guessed.
    """
    missing = [pip for module, pip in TOKENIZER_PACKAGES.items() if not _installed(module)]
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if not missing:
        return ModelNotFoundError(f"cannot build the tokenizer of {name!r} ({setting}): {detail}")
    packages = " ".join(missing)
    return ModelNotFoundError(
        f"cannot build the tokenizer of {name!r} ({setting}): it needs the {', '.join(missing)} "
        f"package{'s' if len(missing) > 1 else ''}, not installed here. Install with `pip install {packages}` "
        f"(or `bash scripts/setup.sh`, which installs vigil's locked dependencies). transformers said: {detail}"
    )


# transformers' from_pretrained swaps process-wide state while it builds a model: it replaces
# PreTrainedModel.tie_weights with a no-op (initialization.no_tie_weights) and sets torch's default
# dtype (local_torch_dtype), restoring both when it returns. Two loads in parallel threads (vigil
# serve loads the VLM and the embedder at once) interleave those swaps: a load can run with tying
# disabled, or restore the no-op as "the original" for good, and a tied checkpoint (no
# lm_head.weight of its own, like LLaVA-OneVision-0.5B) then keeps lm_head on the meta device
# ("lm_head.weight MISSING", then "Cannot copy out of meta tensor"). Every from_pretrained of a
# model in vlm/ goes through ``load_pretrained``, which serialises them.
_LOAD_LOCK = threading.Lock()


def load_pretrained(model_class: type[PreTrainedModel], source: str, dtype: torch.dtype) -> PreTrainedModel:
    """``model_class.from_pretrained(source, dtype=dtype)``, one load at a time in this process."""
    with _LOAD_LOCK:
        return model_class.from_pretrained(source, dtype=dtype)


def _greedy_eos(model: PreTrainedModel, tokenizer: Any) -> frozenset[int]:
    """Every id that ends an answer: the tokenizer's EOS and the generation config's."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, model.generation_config.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Sequence):
            ids.update(int(v) for v in value)
    return frozenset(ids)


_PROBE = "vigil-template-probe"


def content_format(tokenizer: Any) -> Literal["list", "string"]:
    """How the tokenizer's chat template wants a message's content: a list of items or a string.

    Processor templates (LLaVA's, Qwen2.5-VL's) iterate over ``[{"type": "text", ...}]`` items; a
    text LM's template (Qwen2-Instruct's) concatenates ``message['content']`` to strings and fails
    on a list with "can only concatenate str (not "list") to str". A probe message tells which.
    """
    for fmt, content in (("list", [{"type": "text", "text": _PROBE}]), ("string", _PROBE)):
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        except (TypeError, jinja2.TemplateError):
            continue
        if _PROBE in text:
            return fmt  # type: ignore[return-value]
    raise ModelNotFoundError("the chat template renders neither list-of-items nor string message content")


# --------------------------------------------------------------------------- the model wrapper


class VisionLanguageModel(ABC):
    """A loaded VLM: ``encode_frames`` for memory, ``generate_stream`` for answers.

    Thread safety: inference only, no state changes after construction, so the encoder thread and
    a generation thread may use one instance at once.
    """

    family: ClassVar[Family]

    def __init__(self, name: str, model: PreTrainedModel, tokenizer: Any, preprocessor: dict[str, Any]) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.preprocessor = preprocessor
        self._embed = model.get_input_embeddings()
        self._eos = _greedy_eos(model, tokenizer)
        self._grid = (0, 0)  # set by each family from its config
        # Strings that would be read as placeholders or turn markers if a user typed them.
        special = {str(t) for t in tokenizer.all_special_tokens}
        special |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self._reserved = sorted(special, key=len, reverse=True)  # longest first: no partial removals
        self._content_format = content_format(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of one frame's token grid."""
        return self._grid

    @property
    def hidden_size(self) -> int:
        """C: width of the LLM's input space (and of every visual token)."""
        return int(self.model.config.get_text_config().hidden_size)

    # ---- vision path

    @abstractmethod
    def preprocess(self, frames: np.ndarray) -> Tensor:
        """frames [T, H, W, 3] uint8 RGB → pixels [T, 3, S, S] float32 (fixed S per model)."""

    @abstractmethod
    def encode_pixels(self, pixels: Tensor) -> VisualTokens:
        """pixels [T, 3, S, S] from ``preprocess`` (any number of callers concatenated) → tokens."""

    def encode_frames(self, frames: np.ndarray) -> VisualTokens:
        """frames [T, H, W, 3] uint8 RGB → VisualTokens (tokens [T, N, C], global [T, G])."""
        return self.encode_pixels(self.preprocess(frames))

    # ---- prompt assembly

    @property
    @abstractmethod
    def _placeholder(self) -> str:
        """Text written into the chat template where a VisualPart goes."""

    @property
    @abstractmethod
    def _placeholder_id(self) -> int:
        """The token id (inside the placeholder) replaced by the part's tokens."""

    @abstractmethod
    def _positions(self, segments: list[Tensor | VisualPart]) -> tuple[Tensor, int]:
        """Position ids of the assembled sequence and the position of the next token.

        segments alternate text ids [L_i] and visual parts; returns (position_ids as the model takes
        them: [1, L] for 1-D RoPE, [3, 1, L] for M-RoPE, and the next position).
        """

    def _visual_embeds(self, part: VisualPart) -> Tensor:
        """[M', C] embeddings that stand for one visual part in the sequence."""
        return part.tokens.to(self.device, self.dtype)

    def _sanitise(self, text: str) -> str:
        for token in self._reserved:
            text = text.replace(token, "")
        return text

    def prompt_ids(self, parts: Sequence[PromptPart], system: str = SYSTEM_PROMPT) -> Tensor:
        """Token ids [L] of the chat (system, user with one placeholder per visual part, assistant cue)."""
        return self.tokenize(self.prompt_text(parts, system))

    def tokenize(self, text: str) -> Tensor:
        """Token ids [L] of already templated text (special tokens as written, none added)."""
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]  # [L]

    def prompt_text(self, parts: Sequence[PromptPart], system: str = SYSTEM_PROMPT) -> str:
        """The chat as text: ``prompt_ids`` before tokenizing (vlm/watch.py splits it at a question)."""
        content = "".join(self._sanitise(p.text) if isinstance(p, TextPart) else self._placeholder for p in parts)
        messages = [
            {"role": "system", "content": [{"type": "text", "text": system}]},
            {"role": "user", "content": [{"type": "text", "text": content}]},
        ]
        if self._content_format == "string":
            messages = [{"role": m["role"], "content": system if m["role"] == "system" else content} for m in messages]
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def assemble(self, parts: Sequence[PromptPart], system: str = SYSTEM_PROMPT) -> tuple[Tensor, Tensor, int]:
        """Prompt → (inputs_embeds [1, L, C], position_ids [1, L] or [3, 1, L], next position)."""
        visuals = [p for p in parts if isinstance(p, VisualPart)]
        return self.assemble_ids(self.prompt_ids(parts, system), visuals)

    def assemble_ids(self, ids: Tensor, visuals: Sequence[VisualPart]) -> tuple[Tensor, Tensor, int]:
        """Token ids [L] with one placeholder per visual part → ``assemble``'s triple.

        Positions start at 0. Text that continues a sequence (vlm/watch.py's questions after a
        cached prefix) adds the prefix's next position: text advances every RoPE row by one.
        """
        for part in visuals:
            if part.tokens.shape[-1] != self.hidden_size:
                raise ValueError(
                    f"visual tokens have {part.tokens.shape[-1]} channels, the model expects {self.hidden_size}"
                )
        slots = (ids == self._placeholder_id).nonzero().flatten().tolist()
        if len(slots) != len(visuals):
            raise ValueError(f"chat template kept {len(slots)} visual placeholders for {len(visuals)} visual parts")
        segments: list[Tensor | VisualPart] = []
        start = 0
        for slot, part in zip(slots, visuals, strict=True):
            segments += [ids[start:slot], part]
            start = slot + 1
        segments.append(ids[start:])
        pieces = [self._embed(s.to(self.device)) if isinstance(s, Tensor) else self._visual_embeds(s) for s in segments]
        embeds = torch.cat(pieces, dim=0).unsqueeze(0)  # [1, L, C]
        positions, next_pos = self._positions(segments)
        return embeds, positions.to(self.device), next_pos

    # ---- generation

    @torch.inference_mode()
    def next_token_logits(self, parts: Sequence[PromptPart], system: str = SYSTEM_PROMPT) -> Tensor:
        """Logits [V] (float32) for the first answer token: the prefill of ``generate_tokens``."""
        embeds, positions, _ = self.assemble(parts, system)
        out = self.model(inputs_embeds=embeds, position_ids=positions, use_cache=False, logits_to_keep=1)
        return out.logits[0, -1].float()

    def _generation_config(self, max_new_tokens: int) -> GenerationConfig:
        """Greedy decoding, EOS from the tokenizer and the checkpoint, nothing that reshapes logits.

        ``generate`` fills every unset field from the checkpoint's ``generation_config.json``; the
        fields that would change greedy answers (sampling, a repetition penalty) are set here, so
        an answer depends only on the prompt.
        """
        eos = sorted(self._eos)
        pad = self.tokenizer.pad_token_id
        return GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            eos_token_id=eos,
            pad_token_id=pad if isinstance(pad, int) else (eos[0] if eos else None),
        )

    def generate_tokens(
        self,
        parts: Sequence[PromptPart],
        *,
        max_new_tokens: int,
        deadline_s: float | None = None,
        system: str = SYSTEM_PROMPT,
    ) -> Iterator[int]:
        """Greedy token ids (EOS excluded), stopping at EOS, ``max_new_tokens`` or ``deadline_s``.

        ``deadline_s`` is a ``time.monotonic()`` instant; it is checked after every new token (so
        before every further model step). Decoding is transformers' ``generate`` on the assembled
        ``inputs_embeds`` with our own ``position_ids`` (``generate`` advances them by one per
        token on every row, which is right for 1-D RoPE and for M-RoPE after a text token), so
        Qwen2.5-VL's ``rope_deltas`` model state is neither needed nor touched. ``generate`` runs on
        a helper thread and hands each token over through its streamer (the pattern of
        transformers' ``TextIteratorStreamer``); leaving the loop early stops it at its next token.
        """
        if max_new_tokens < 1 or (deadline_s is not None and time.monotonic() >= deadline_s):
            return
        # Inference mode is entered for the assembly only, never held across a yield: grad mode is
        # thread-local and would otherwise leak into the consumer while the generator waits.
        with torch.inference_mode():
            embeds, positions, _ = self.assemble(parts, system)  # [1, L, C], [1, L] or [3, 1, L]
        stop = threading.Event()
        criteria = StoppingCriteriaList([_StopWhenSet(stop)])
        if deadline_s is not None:
            # MaxTimeCriteria counts wall-clock seconds from its construction (time.time()).
            criteria.append(MaxTimeCriteria(max_time=deadline_s - time.monotonic()))
        streamer = _TokenQueue()

        def run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        inputs_embeds=embeds,
                        position_ids=positions,
                        attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device),
                        generation_config=self._generation_config(max_new_tokens),
                        stopping_criteria=criteria,
                        streamer=streamer,
                    )
            except BaseException as exc:  # handed to the consumer thread and re-raised there
                streamer.fail(exc)

        worker = threading.Thread(target=run, name="vigil-generate-steps", daemon=True)
        worker.start()
        try:
            for token in streamer:
                if token in self._eos:
                    return
                yield token
        finally:
            stop.set()  # the consumer left early (closed, cancelled): generate ends at its next token
            worker.join()

    def generate_stream(
        self,
        parts: list[PromptPart],
        *,
        max_new_tokens: int,
        deadline_s: float | None = None,
        system: str = SYSTEM_PROMPT,
    ) -> Iterator[str]:
        """Answer text deltas for the user turn ``parts`` (greedy, KV-cached; see ``text_deltas``).

        Stops at EOS, after ``max_new_tokens`` tokens, or once ``time.monotonic()`` passes
        ``deadline_s``.
        """
        started = time.monotonic()
        tokens = self.generate_tokens(parts, max_new_tokens=max_new_tokens, deadline_s=deadline_s, system=system)
        yield from text_deltas(self.tokenizer, tokens)
        logger.debug("generated an answer in %.2f s", time.monotonic() - started)


def text_deltas(tokenizer: Any, tokens: Iterable[int]) -> Iterator[str]:
    """Token ids as they are generated → text deltas that add up to the answer, whole characters only.

    A byte-level tokenizer (Qwen's) decodes the bytes of an unfinished UTF-8 character as U+FFFD,
    so text ending in it is held back until the character is complete, and dropped if the tokens
    end first (``max_new_tokens`` or the deadline stopped generation in the middle of its bytes;
    a model that really ends on U+FFFD loses it: rare and harmless).
    """
    ids: list[int] = []
    emitted = ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith(_INCOMPLETE_UTF8) or not text.startswith(emitted):
            continue
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
    text = tokenizer.decode(ids, skip_special_tokens=True).rstrip(_INCOMPLETE_UTF8)
    if text.startswith(emitted) and len(text) > len(emitted):
        yield text[len(emitted) :]


class _StopWhenSet(StoppingCriteria):
    """Stops ``generate`` once an event is set (the consumer of its tokens has gone)."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: Tensor, scores: Tensor | None, **kwargs: Any) -> Tensor:
        """input_ids [B, L] → [B] bool: done for every sequence once the event is set."""
        return torch.full((input_ids.shape[0],), self._event.is_set(), dtype=torch.bool, device=input_ids.device)


_END = object()


class _TokenQueue(BaseStreamer):
    """``generate``'s streamer: each step's new token id, iterated on another thread.

    ``generate`` first puts the prompt's ids (an empty [1, 0] tensor when it is given
    ``inputs_embeds``), then [1] per step, including a final EOS; ``end`` closes the stream.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._prompt_seen = False

    def put(self, value: Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._queue.put(int(token))

    def end(self) -> None:
        self._queue.put(_END)

    def fail(self, exc: BaseException) -> None:
        self._queue.put(exc)
        self._queue.put(_END)

    def __iter__(self) -> Iterator[int]:
        while (item := self._queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield int(item)  # type: ignore[call-overload]


# --------------------------------------------------------------------------- LLaVA-OneVision


class LlavaOneVisionVLM(VisionLanguageModel):
    """LLaVA-OneVision through its video path (2x2 pooled SigLIP features)."""

    family: ClassVar[Family] = "llava_onevision"

    def __init__(self, name: str, model: PreTrainedModel, tokenizer: Any, preprocessor: dict[str, Any]) -> None:
        super().__init__(name, model, tokenizer, preprocessor)
        config = model.config
        side = int(config.vision_config.image_size)
        self._spec = PixelSpec.from_config(preprocessor, side, side)
        patches = side // int(config.vision_config.patch_size)
        pooled = -(-patches // 2)  # ceil: the model's apply_pooling uses ceil(P / 2)
        self._grid = (pooled, pooled)
        self._video_token = int(config.video_token_index)

    def preprocess(self, frames: np.ndarray) -> Tensor:
        return to_pixels(frames, self._spec)  # [T, 3, S, S]

    @torch.inference_mode()
    def encode_pixels(self, pixels: Tensor) -> VisualTokens:
        t = pixels.shape[0]
        rows, cols = self._grid
        if t == 0:
            return VisualTokens(
                torch.zeros(0, rows * cols, self.hidden_size),
                torch.zeros(0, self._vision_width()),
                self._grid,
            )
        video = pixels.to(self.device, self.dtype).unsqueeze(0)  # [1, T, 3, S, S]
        out = self.model.model.get_video_features(video, output_hidden_states=True, return_dict=True)
        # [1, T·N + 1, C]: the last token is the model's single image_newline after the video.
        tokens = out.pooler_output[0, :-1].reshape(t, rows * cols, -1)  # [T, N, C]
        layer = self.model.config.vision_feature_layer
        layers = [layer] if isinstance(layer, int) else list(layer)
        patch_feats = torch.cat([out.hidden_states[i] for i in layers], dim=-1)  # [T, P, Cv]
        global_feats = torch.nn.functional.normalize(patch_feats.float().mean(dim=1), dim=-1)  # [T, G]
        return VisualTokens(tokens.float().cpu(), global_feats.cpu(), self._grid)

    def _vision_width(self) -> int:
        layer = self.model.config.vision_feature_layer
        n = 1 if isinstance(layer, int) else len(layer)
        return n * int(self.model.config.vision_config.hidden_size)

    @property
    def _placeholder(self) -> str:
        return str(self.tokenizer.convert_ids_to_tokens(self._video_token))

    @property
    def _placeholder_id(self) -> int:
        return self._video_token

    def _visual_embeds(self, part: VisualPart) -> Tensor:
        # The model always sees its newline token after a video's frames; keep that boundary.
        newline = self.model.model.image_newline.to(self.device, self.dtype)[None]  # [1, C]
        return torch.cat([part.tokens.to(self.device, self.dtype), newline], dim=0)  # [M + 1, C]

    def _positions(self, segments: list[Tensor | VisualPart]) -> tuple[Tensor, int]:
        length = sum(s.shape[0] if isinstance(s, Tensor) else s.tokens.shape[0] + 1 for s in segments)
        return torch.arange(length).view(1, length), length


# --------------------------------------------------------------------------- Qwen2.5-VL


class Qwen25VLVLM(VisionLanguageModel):
    """Qwen2.5-VL: frames as images through the windowed ViT and merger; 3-D M-RoPE positions."""

    family: ClassVar[Family] = "qwen2_5_vl"

    def __init__(self, name: str, model: PreTrainedModel, tokenizer: Any, preprocessor: dict[str, Any]) -> None:
        super().__init__(name, model, tokenizer, preprocessor)
        vision = model.config.vision_config
        self._patch = int(vision.patch_size)
        self._merge = int(vision.spatial_merge_size)
        self._tps = int(vision.temporal_patch_size)
        size = preprocessor.get("size") or {}
        min_pixels = int(preprocessor.get("min_pixels") or size.get("shortest_edge") or 0)
        max_pixels = int(preprocessor.get("max_pixels") or size.get("longest_edge") or QWEN_TARGET_SIDE**2)
        side = qwen_frame_side(min_pixels, max_pixels, self._patch * self._merge, QWEN_TARGET_SIDE)
        self._spec = PixelSpec.from_config(preprocessor, side, side)
        rows = side // self._patch // self._merge
        self._grid = (rows, rows)
        self._image_token = int(model.config.image_token_id)
        self._start = str(tokenizer.convert_ids_to_tokens(int(model.config.vision_start_token_id)))
        self._end = str(tokenizer.convert_ids_to_tokens(int(model.config.vision_end_token_id)))

    def preprocess(self, frames: np.ndarray) -> Tensor:
        return to_pixels(frames, self._spec)  # [T, 3, S, S]

    @torch.inference_mode()
    def encode_pixels(self, pixels: Tensor) -> VisualTokens:
        t = pixels.shape[0]
        rows, cols = self._grid
        if t == 0:
            width = int(self.model.config.vision_config.hidden_size)
            return VisualTokens(torch.zeros(0, rows * cols, self.hidden_size), torch.zeros(0, width), self._grid)
        flat, grid_thw = qwen_patchify(pixels, self._patch, self._merge, self._tps)  # [T·gh·gw, D], [T, 3]
        out = self.model.model.visual(flat.to(self.device, self.dtype), grid_thw=grid_thw.to(self.device))
        tokens = out.pooler_output.reshape(t, rows * cols, -1)  # [T, N, C] raster order per frame
        # last_hidden_state is window-permuted, but only within each frame, so per-frame means hold.
        patch_feats = out.last_hidden_state.reshape(t, -1, out.last_hidden_state.shape[-1])  # [T, P, Cv]
        global_feats = torch.nn.functional.normalize(patch_feats.float().mean(dim=1), dim=-1)  # [T, G]
        return VisualTokens(tokens.float().cpu(), global_feats.cpu(), self._grid)

    @property
    def _placeholder(self) -> str:
        return self._start + str(self.tokenizer.convert_ids_to_tokens(self._image_token)) + self._end

    @property
    def _placeholder_id(self) -> int:
        return self._image_token

    def _positions(self, segments: list[Tensor | VisualPart]) -> tuple[Tensor, int]:
        """3-D positions, as ``Qwen2_5_VLModel.get_rope_index`` gives an image's full grid.

        Text advances all three rows by one per token. A visual block starting at position s puts
        token (frame f, row r, col c) at (s + f, s + r, s + c); a summary token (row or col < 0)
        has no place and sits at (s + f, s + f, s + f). Text after the block continues at the
        block's largest id + 1, which for one full frame is s + max(rows, cols), as in Qwen.
        """
        blocks: list[Tensor] = []
        pos = 0
        for segment in segments:
            if isinstance(segment, Tensor):
                n = segment.shape[0]
                blocks.append((torch.arange(n) + pos).view(1, n).expand(3, n))
                pos += n
                continue
            if segment.tokens.shape[0] == 0:
                continue
            f = segment.frame.long()
            placed = (segment.row >= 0) & (segment.col >= 0)
            r = torch.where(placed, segment.row.long(), f)
            c = torch.where(placed, segment.col.long(), f)
            block = torch.stack([f, r, c]) + pos  # [3, M]
            blocks.append(block)
            pos = int(block.max()) + 1
        positions = torch.cat(blocks, dim=1) if blocks else torch.zeros(3, 0, dtype=torch.long)  # [3, L]
        return positions.unsqueeze(1), pos  # [3, 1, L]


# --------------------------------------------------------------------------- loading


def _processor_chat_template(source: str, setting: str) -> str | None:
    """The processor's chat template (``chat_template.json``), or None when the checkpoint has none."""
    try:
        path = cached_file(source, "chat_template.json", _raise_exceptions_for_missing_entries=False)
    except (OSError, ValueError) as exc:
        raise not_found_error(source, setting, exc) from exc
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        template = json.load(handle).get("chat_template")
    if not isinstance(template, str):
        raise ModelNotFoundError(f"{path}: no 'chat_template' string")
    return template


FAMILIES: dict[str, tuple[type[VisionLanguageModel], type[PreTrainedModel]]] = {
    "llava_onevision": (LlavaOneVisionVLM, LlavaOnevisionForConditionalGeneration),
    "qwen2_5_vl": (Qwen25VLVLM, Qwen2_5_VLForConditionalGeneration),
}


def load_vlm(name_or_dir: str, device: str = "auto", dtype: str = "auto") -> VisionLanguageModel:
    """Load a VLM checkpoint (hub id or local ``save_pretrained`` directory) for inference.

    device: auto | cpu | cuda; dtype: auto | float32 | bfloat16 | float16 (see ``resolve_dtype``).
    Raises ModelNotFoundError when it cannot be found, UnsupportedModelError for other families.
    """
    setting = "models.vlm"
    config = load_config(name_or_dir, setting)
    try:
        wrapper, model_class = FAMILIES[config.model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"{name_or_dir!r} is a {config.model_type!r} model; vigil supports {', '.join(sorted(FAMILIES))}"
        ) from None
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    source = str(Path(name_or_dir).expanduser()) if Path(name_or_dir).expanduser().is_dir() else name_or_dir
    try:
        model = load_pretrained(model_class, source, torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise not_found_error(name_or_dir, setting, exc) from exc
    except ImportError as exc:
        raise tokenizer_import_error(name_or_dir, setting, exc) from exc
    model = model.to(torch_device).eval()
    # A VLM's prompt format is its processor's template (what AutoProcessor.apply_chat_template
    # uses); the tokenizer may carry its text LM's own template (LLaVA-OneVision's Qwen2-Instruct
    # one), which knows nothing of images or videos.
    template = _processor_chat_template(source, setting)
    if template is not None:
        tokenizer.chat_template = template
    elif tokenizer.chat_template is None:
        raise ModelNotFoundError(f"{name_or_dir!r} has no chat template (tokenizer or chat_template.json)")
    preprocessor = read_preprocessor_config(resolve_file(source, "preprocessor_config.json", setting))
    vlm = wrapper(name_or_dir, model, tokenizer, preprocessor)
    logger.info(
        "loaded %s (%s) on %s as %s: %d visual tokens per frame, hidden size %d",
        name_or_dir,
        vlm.family,
        torch_device,
        torch_dtype,
        vlm.grid[0] * vlm.grid[1],
        vlm.hidden_size,
    )
    return vlm
