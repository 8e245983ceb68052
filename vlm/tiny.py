"""Tiny, randomly initialised models of the real architectures, built offline for tests.

``make_tiny(DIR)`` writes three ``save_pretrained`` directories that vigil loads through exactly
the same ``load_vlm`` / ``load_embedder`` path as the real checkpoints:

* ``DIR/vlm``: LLaVA-OneVision (SigLIP vision tower + 2-layer MLP projector + Qwen2 LM),
* ``DIR/qwen2_5_vl``: Qwen2.5-VL (windowed ViT + patch merger + M-RoPE Qwen2 LM),
* ``DIR/embedder``: SigLIP (image and text towers), with a SentencePiece ``SiglipTokenizer``.

The tokenizer is a byte-level BPE trained here on a small built-in text, with the special tokens
of the Qwen2 family and a chat template, so nothing is downloaded. Sizes are chosen so that one
frame gives a 7x7 token grid (enough for the compressor to merge something) while a frame costs
milliseconds on a CPU. Weights are seeded, so two builds are identical.
"""

from __future__ import annotations

import argparse
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    SiglipConfig,
    SiglipModel,
    SiglipTokenizer,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

logger = logging.getLogger(__name__)

SEED = 1234

# Special tokens in the order (and so with the ids 0..8) used by the Qwen2 tokenizer family.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
TOKEN_ID = {token: index for index, token in enumerate(SPECIAL_TOKENS)}

VOCAB_SIZE = 1024
# Text side shared by both VLMs: head_dim = 128 / 4 = 32, so M-RoPE sections must sum to 16.
TEXT_HIDDEN = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2
TEXT_LAYERS = 2
MROPE_SECTION = [4, 6, 6]
TEXT_INIT_RANGE = 0.1
PATCH = 14
# LLaVA-OV pools the patch grid 2x2 for video: 196 px / 14 = 14 patches -> a 7x7 token grid.
LLAVA_IMAGE_SIDE = 196
# Qwen2.5-VL merges 2x2 patches: frames resized to 196 px -> 14x14 patches -> a 7x7 token grid.
QWEN_FRAME_SIDE = 196
SIGLIP_IMAGE_SIDE = 112
SIGLIP_TEXT_LENGTH = 64
SIGLIP_PIECES = 512  # an upper bound: the built-in text gives about 160 pieces
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
SIGLIP_MEAN = [0.5, 0.5, 0.5]
SIGLIP_STD = [0.5, 0.5, 0.5]

# The Qwen2 chat format. Visual items are rendered as each family's placeholder; vigil itself
# only sends text items (it splices visual tokens in at placeholder tokens it writes).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] }}"
    "{%- elif item['type'] == 'image' -%}{{ IMAGE }}"
    "{%- elif item['type'] == 'video' -%}{{ VIDEO }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_TRAINING_TEXT = """
A person walks through the front door carrying a brown parcel and leaves it on the porch.
A red car drives into the driveway, parks next to the garage and the lights turn off.
Two people talk near the gate at night; a dog runs across the lawn in the rain.
The delivery van stopped at 14:05 and the driver rang the bell twice before leaving.
What happened in the kitchen this morning? Was anyone in the garden after midnight?
Nothing moved in the parking lot between 02:00 and 05:00; a cat crossed the street at 03:12.
Camera front_door saw a bicycle; camera backyard saw a bottle on the table and a ball.
Answer the question using the video memory. Cite the camera and the time of each claim.
0123456789 :-,.;!?'"()[]{} the of and to in is was at on with for by from this that
"""


@dataclass(frozen=True, slots=True)
class TinyModels:
    """Directories written by ``make_tiny``."""

    root: Path
    vlm: Path  # LLaVA-OneVision
    qwen2_5_vl: Path  # Qwen2.5-VL
    embedder: Path  # SigLIP


def build_tokenizer(chat_template: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the built-in text (deterministic, 0.02 s)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the vocabulary, so any text (and any language) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT.strip().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
    )
    fast.chat_template = chat_template
    return fast


def _text_config() -> dict[str, object]:
    return {
        "model_type": "qwen2",
        "vocab_size": VOCAB_SIZE,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 2 * TEXT_HIDDEN,
        "num_hidden_layers": TEXT_LAYERS,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": 4096,
        # The real Qwen2-0.5B (LLaVA-OneVision) and Qwen2.5-VL-3B tie lm_head to embed_tokens; a
        # tied checkpoint has no lm_head.weight of its own, which is what parallel loads broke.
        "tie_word_embeddings": True,
        # With tied embeddings and the default 0.02, a random 2-layer LM's last hidden state stays
        # close to its input token's embedding, so it repeats the prompt's last token ("\n")
        # forever; a wider init lets the layers move it, and answers are varied text.
        "initializer_range": TEXT_INIT_RANGE,
        "eos_token_id": TOKEN_ID["<|im_end|>"],
        "pad_token_id": TOKEN_ID["<|endoftext|>"],
        "bos_token_id": TOKEN_ID["<|endoftext|>"],
    }


def _generation_config() -> GenerationConfig:
    return GenerationConfig(
        eos_token_id=[TOKEN_ID["<|im_end|>"], TOKEN_ID["<|endoftext|>"]],
        pad_token_id=TOKEN_ID["<|endoftext|>"],
        do_sample=False,
    )


def _write_llava(out: Path) -> None:
    config = LlavaOnevisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": LLAVA_IMAGE_SIDE,
            "patch_size": PATCH,
        },
        text_config=_text_config(),
        image_token_index=TOKEN_ID["<image>"],
        video_token_index=TOKEN_ID["<video>"],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[LLAVA_IMAGE_SIDE, LLAVA_IMAGE_SIDE]],
    )
    torch.manual_seed(SEED)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = _generation_config()
    model.save_pretrained(out)
    template = CHAT_TEMPLATE.replace("{{ IMAGE }}", "<image>").replace("{{ VIDEO }}", "<video>")
    build_tokenizer(template).save_pretrained(out)
    LlavaOnevisionImageProcessorPil(
        size={"height": LLAVA_IMAGE_SIDE, "width": LLAVA_IMAGE_SIDE},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        image_grid_pinpoints=[[LLAVA_IMAGE_SIDE, LLAVA_IMAGE_SIDE]],
    ).save_pretrained(out)


def _write_qwen(out: Path) -> None:
    config = Qwen2_5_VLConfig(
        vision_config={
            "depth": 2,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
            "out_hidden_size": TEXT_HIDDEN,
            "patch_size": PATCH,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "tokens_per_second": 2,
        },
        text_config={
            **_text_config(),
            "model_type": "qwen2_5_vl_text",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": MROPE_SECTION},
        },
        image_token_id=TOKEN_ID["<|image_pad|>"],
        video_token_id=TOKEN_ID["<|video_pad|>"],
        vision_start_token_id=TOKEN_ID["<|vision_start|>"],
        vision_end_token_id=TOKEN_ID["<|vision_end|>"],
    )
    torch.manual_seed(SEED + 1)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = _generation_config()
    model.save_pretrained(out)
    template = CHAT_TEMPLATE.replace("{{ IMAGE }}", "<|vision_start|><|image_pad|><|vision_end|>").replace(
        "{{ VIDEO }}", "<|vision_start|><|video_pad|><|vision_end|>"
    )
    build_tokenizer(template).save_pretrained(out)
    Qwen2VLImageProcessorPil(
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        min_pixels=4 * PATCH * PATCH,
        max_pixels=QWEN_FRAME_SIDE * QWEN_FRAME_SIDE,
        patch_size=PATCH,
        temporal_patch_size=2,
        merge_size=2,
    ).save_pretrained(out)


def build_siglip_tokenizer(work: Path) -> SiglipTokenizer:
    """SigLIP's tokenizer class on a SentencePiece model trained here on the built-in text (0.1 s).

    The real checkpoint's tokenizer is a 32000-piece SentencePiece model loaded by
    ``SiglipTokenizer``, which needs the sentencepiece and protobuf packages; this one takes the
    same path. Piece ids follow the real one: pad 0, eos 1, unk 2.
    """
    work.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_TRAINING_TEXT.strip().splitlines()),
        model_writer=model,
        vocab_size=SIGLIP_PIECES,
        hard_vocab_limit=False,  # the built-in text yields fewer pieces; take what it gives
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        minloglevel=2,
    )
    path = work / "spiece.model"
    path.write_bytes(model.getvalue())
    return SiglipTokenizer(vocab_file=str(path), model_max_length=SIGLIP_TEXT_LENGTH)


def _write_siglip(out: Path) -> None:
    tokenizer = build_siglip_tokenizer(out.parent / f"{out.name}-spiece")
    config = SiglipConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": SIGLIP_TEXT_LENGTH,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SIGLIP_IMAGE_SIDE,
            "patch_size": PATCH,
        },
    )
    torch.manual_seed(SEED + 2)
    SiglipModel(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    SiglipImageProcessorPil(
        size={"height": SIGLIP_IMAGE_SIDE, "width": SIGLIP_IMAGE_SIDE},
        image_mean=SIGLIP_MEAN,
        image_std=SIGLIP_STD,
    ).save_pretrained(out)


def make_tiny(directory: str | Path) -> TinyModels:
    """Write tiny LLaVA-OneVision, Qwen2.5-VL and SigLIP models under ``directory``."""
    root = Path(directory)
    paths = TinyModels(
        root=root, vlm=root / "vlm", qwen2_5_vl=root / "qwen2_5_vl", embedder=root / "embedder"
    )
    for path in (paths.vlm, paths.qwen2_5_vl, paths.embedder):
        path.mkdir(parents=True, exist_ok=True)
    _write_llava(paths.vlm)
    _write_qwen(paths.qwen2_5_vl)
    _write_siglip(paths.embedder)
    logger.info("wrote tiny models to %s", root)
    return paths


def cli_make_tiny(args: argparse.Namespace) -> int:
    """``vigil models make-tiny DIR``."""
    paths = make_tiny(args.dir)
    for path in (paths.vlm, paths.qwen2_5_vl, paths.embedder):
        print(path)
    return 0
