"""Model loading, the vision path, generation and the embedder, on tiny real-architecture models.

Frames are real: decoded from tests/data/car-detection.mp4 with PyAV. The equivalence tests
compare our ``inputs_embeds`` assembly (chat template, spliced visual tokens, positions) with the
model's own pixel path on the same pixels: the logits must agree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from streamer.cli import main
from tests.plugins.models import clip_frames
from vlm.embedder import Embedder, load_embedder
from vlm.models import (
    FAMILIES,
    ModelNotFoundError,
    UnsupportedModelError,
    VisionLanguageModel,
    load_vlm,
    resolve_dtype,
)
from vlm.preprocess import FrameError, qwen_patchify
from vlm.tiny import TinyModels
from vlm.types import TextPart, VisualPart

LOGIT_ATOL = 1e-4
ROUNDS = 4  # parallel loads per test: each round had a fair chance to lose the race


@pytest.fixture(scope="module")
def frames() -> np.ndarray:
    return clip_frames(3)


def full_part(tokens: torch.Tensor, grid: tuple[int, int], frame_index: int = 0) -> VisualPart:
    """Uncompressed tokens [N, C] of one frame, with their grid provenance."""
    rows, cols = grid
    n = rows * cols
    return VisualPart(
        tokens=tokens,
        frame=torch.full((n,), frame_index, dtype=torch.int32),
        row=(torch.arange(n) // cols).to(torch.int16),
        col=(torch.arange(n) % cols).to(torch.int16),
    )


# --------------------------------------------------------------------------- loading


def test_tiny_models_load_offline_through_from_pretrained(tiny_vlm, tiny_qwen, tiny_embedder):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert tiny_vlm.family == "llava_onevision"
    assert tiny_qwen.family == "qwen2_5_vl"
    assert set(FAMILIES) == {"llava_onevision", "qwen2_5_vl"}
    for vlm in (tiny_vlm, tiny_qwen):
        rows, cols = vlm.grid
        assert min(rows, cols) >= 7, "the compressor needs a grid of at least 7x7 tokens"
        assert vlm.hidden_size == vlm.model.get_input_embeddings().embedding_dim
        assert vlm.dtype == torch.float32
    assert tiny_embedder.dim > 0
    assert type(tiny_embedder.tokenizer).__name__ == "SiglipTokenizer"  # SentencePiece, as the real one


def test_cli_make_tiny_writes_loadable_models(tmp_path):
    assert main(["models", "make-tiny", str(tmp_path)]) == 0
    for name in ("vlm", "qwen2_5_vl", "embedder"):
        assert (tmp_path / name / "config.json").is_file()
        assert (tmp_path / name / "preprocessor_config.json").is_file()
    assert load_vlm(str(tmp_path / "vlm"), device="cpu").family == "llava_onevision"
    assert load_vlm(str(tmp_path / "qwen2_5_vl"), device="cpu").family == "qwen2_5_vl"
    assert load_embedder(str(tmp_path / "embedder"), device="cpu").dim > 0


def test_chat_template_kept_with_the_processor_is_found(tiny_models: TinyModels, tmp_path):
    # Some hub checkpoints (llava-hf) keep the template in chat_template.json, not the tokenizer.
    copy = tmp_path / "vlm"
    shutil.copytree(tiny_models.vlm, copy)
    template = (copy / "chat_template.jinja").read_text()
    (copy / "chat_template.jinja").unlink()
    (copy / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    vlm = load_vlm(str(copy), device="cpu")
    assert vlm.tokenizer.chat_template == template
    assert vlm.prompt_ids([TextPart("hi")]).numel() > 0


def test_loading_in_parallel_with_the_embedder_keeps_tied_embeddings(tiny_models: TinyModels):
    # vigil serve loads both models at once, in two threads; the checkpoint ties lm_head to
    # embed_tokens, as the real ones do, so it stores no lm_head weight of its own.
    from transformers import PreTrainedModel

    original = PreTrainedModel.tie_weights
    try:
        for _ in range(ROUNDS):
            start = threading.Barrier(2)

            def vlm(start: threading.Barrier = start) -> VisionLanguageModel:
                start.wait()
                return load_vlm(str(tiny_models.vlm), device="cpu")

            def embedder(start: threading.Barrier = start) -> Embedder:
                start.wait()
                return load_embedder(str(tiny_models.embedder), device="cpu")

            with ThreadPoolExecutor(max_workers=2) as pool:
                loading = pool.submit(vlm), pool.submit(embedder)
                model = loading[0].result().model
                loading[1].result()
            head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
            assert head.data_ptr() == embed.data_ptr(), "lm_head is not tied to embed_tokens"
            assert not [name for name, p in model.named_parameters() if p.is_meta]
        assert PreTrainedModel.tie_weights is original
    finally:
        # A lost race leaves tie_weights a no-op for every later load in this process.
        PreTrainedModel.tie_weights = original


@pytest.mark.parametrize(
    ("blocked", "package"), [("google,google.protobuf", "protobuf"), ("sentencepiece", "sentencepiece")]
)
def test_a_missing_tokenizer_package_is_named_with_how_to_install_it(tiny_models: TinyModels, blocked, package):
    # SigLIP's SentencePiece tokenizer needs sentencepiece and protobuf; a child process where one
    # cannot be imported (None in sys.modules) stands for a machine without it.
    code = (
        "import sys\n"
        f"for name in {blocked!r}.split(','):\n"
        "    sys.modules[name] = None\n"
        "from vlm.embedder import load_embedder\n"
        "from vlm.models import ModelNotFoundError\n"
        "try:\n"
        f"    load_embedder({str(tiny_models.embedder)!r}, device='cpu')\n"
        "except ModelNotFoundError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert f"pip install {package}" in result.stdout
    assert f"needs the {package} package" in result.stdout
    other = ({"protobuf", "sentencepiece"} - {package}).pop()
    assert other not in result.stdout.split("transformers said:")[0]


def test_unknown_hub_id_offline_names_the_id_and_the_fix():
    with pytest.raises(ModelNotFoundError) as info:
        load_vlm("vigil-tests/no-such-model", device="cpu")
    message = str(info.value)
    assert "vigil-tests/no-such-model" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "set models.vlm to a directory" in message
    with pytest.raises(ModelNotFoundError, match=r"models\.embedder"):
        load_embedder("vigil-tests/no-such-embedder", device="cpu")


def test_missing_local_directory_is_reported_as_local(tmp_path):
    missing = tmp_path / "not-there"
    with pytest.raises(ModelNotFoundError, match=r"local directory\) does not exist"):
        load_vlm(str(missing), device="cpu")


def test_unsupported_model_type_lists_supported_families(tiny_models: TinyModels):
    with pytest.raises(UnsupportedModelError, match="llava_onevision, qwen2_5_vl"):
        load_vlm(str(tiny_models.embedder), device="cpu")


def test_dtype_rules():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", cpu)


# --------------------------------------------------------------------------- vision path


@pytest.mark.parametrize("which", ["tiny_vlm", "tiny_qwen"])
def test_encode_frames_shapes_on_real_frames(which, frames, request):
    vlm: VisionLanguageModel = request.getfixturevalue(which)
    out = vlm.encode_frames(frames)
    rows, cols = out.grid
    t = frames.shape[0]
    assert out.tokens.shape == (t, rows * cols, vlm.hidden_size)
    assert out.global_feats.shape[0] == t
    assert torch.isfinite(out.tokens).all()
    torch.testing.assert_close(out.global_feats.norm(dim=-1), torch.ones(t))
    # Different frames of a moving scene give different tokens; one frame alone gives the same tokens.
    assert not torch.allclose(out.tokens[0], out.tokens[-1])
    alone = vlm.encode_frames(frames[1:2])
    torch.testing.assert_close(alone.tokens[0], out.tokens[1], atol=1e-4, rtol=1e-4)


def test_bad_frames_get_a_clear_error(tiny_vlm):
    with pytest.raises(FrameError, match=r"\[T, H, W, 3\]"):
        tiny_vlm.encode_frames(np.zeros((4, 32, 32), dtype=np.uint8))
    with pytest.raises(FrameError, match="uint8"):
        tiny_vlm.encode_frames(np.zeros((1, 32, 32, 3), dtype=np.float32))


def test_qwen_patchify_matches_the_hf_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, 56, 84, generator=generator)  # [T, C, H, W]
    flat, grid = qwen_patchify(pixels, patch_size=14, merge_size=2, temporal_patch_size=2)
    processor = Qwen2VLImageProcessorPil()
    expected = [processor.patchify(frame.numpy(), 14, 2, 2)[0] for frame in pixels]
    np.testing.assert_array_equal(flat.numpy(), np.concatenate(expected))
    assert grid.tolist() == [[1, 4, 6], [1, 4, 6]]


# --------------------------------------------------------------------------- generation


def test_llava_inputs_embeds_path_matches_the_models_video_path(tiny_vlm, frames):
    vlm = tiny_vlm
    encoded = vlm.encode_frames(frames)
    t, n, c = encoded.tokens.shape
    cols = encoded.grid[1]
    part = VisualPart(
        tokens=encoded.tokens.reshape(t * n, c),
        frame=torch.arange(t, dtype=torch.int32).repeat_interleave(n),
        row=(torch.arange(n) // cols).repeat(t).to(torch.int16),
        col=(torch.arange(n) % cols).repeat(t).to(torch.int16),
    )
    ours = vlm.next_token_logits([TextPart("Look: "), part, TextPart(" What is the car doing?")])

    # The model's own path: its chat template with a video item, pixels through get_video_features.
    content = [
        {"type": "text", "text": "Look: "},
        {"type": "video"},
        {"type": "text", "text": " What is the car doing?"},
    ]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": content},
    ]
    text = vlm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    video_id = vlm.model.config.video_token_index
    slot = ids.index(video_id)
    ids = ids[:slot] + [video_id] * (t * n + 1) + ids[slot + 1 :]  # frames' tokens + the newline
    with torch.inference_mode():
        reference = vlm.model(
            input_ids=torch.tensor([ids]), pixel_values_videos=vlm.preprocess(frames).unsqueeze(0)
        ).logits[0, -1]
    torch.testing.assert_close(ours, reference, atol=LOGIT_ATOL, rtol=0)


def test_qwen_3d_positions_match_the_models_pixel_path(tiny_qwen, frames):
    vlm = tiny_qwen
    two = frames[:2]
    encoded = vlm.encode_frames(two)
    parts = [
        TextPart("First: "),
        full_part(encoded.tokens[0], encoded.grid),
        TextPart(" then: "),
        full_part(encoded.tokens[1], encoded.grid),
        TextPart(" Did the car move?"),
    ]
    ours = vlm.next_token_logits(parts)

    content = [
        {"type": "text", "text": "First: "},
        {"type": "image"},
        {"type": "text", "text": " then: "},
        {"type": "image"},
        {"type": "text", "text": " Did the car move?"},
    ]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": content},
    ]
    text = vlm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pad = vlm.model.config.image_token_id
    ids: list[int] = []
    n = encoded.tokens.shape[1]
    for token in vlm.tokenizer(text, add_special_tokens=False)["input_ids"]:
        ids += [pad] * n if token == pad else [token]
    input_ids = torch.tensor([ids])
    pixel_values, grid_thw = qwen_patchify(vlm.preprocess(two), 14, 2, 2)
    try:
        with torch.inference_mode():
            reference = vlm.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                image_grid_thw=grid_thw,
                mm_token_type_ids=(input_ids == pad).int(),
            ).logits[0, -1]
        # That path left state on the model (rope_deltas); our generation must not depend on it.
        assert vlm.model.model.rope_deltas is not None
        torch.testing.assert_close(vlm.next_token_logits(parts), ours)
        stale = list(vlm.generate_tokens(parts, max_new_tokens=4))
    finally:
        vlm.model.model.rope_deltas = None  # the pixel path caches it on the shared model
    assert list(vlm.generate_tokens(parts, max_new_tokens=4)) == stale
    torch.testing.assert_close(ours, reference, atol=LOGIT_ATOL, rtol=0)

    # The same embeddings with plain 1-D positions give other logits: positions matter here.
    embeds, _, _ = vlm.assemble(parts)
    with torch.inference_mode():
        flat = vlm.model(inputs_embeds=embeds, position_ids=torch.arange(embeds.shape[1])[None]).logits[0, -1]
    assert (flat - reference).abs().max() > 10 * LOGIT_ATOL


@pytest.mark.parametrize("which", ["tiny_vlm", "tiny_qwen"])
def test_generate_stream_yields_text_and_stops_at_max_new_tokens(which, frames, request):
    vlm: VisionLanguageModel = request.getfixturevalue(which)
    encoded = vlm.encode_frames(frames[:1])
    parts = [TextPart("[front_door] 10:00-10:08:\n"), full_part(encoded.tokens[0], encoded.grid)]
    parts.append(TextPart("\nQuestion: what happened?\nAnswer:"))
    tokens = []
    for token in vlm.generate_tokens(parts, max_new_tokens=6):
        assert not torch.is_inference_mode_enabled(), "generation must not leak its grad mode"
        tokens.append(token)
    longer = list(vlm.generate_tokens(parts, max_new_tokens=9))
    assert len(tokens) == 6, "the seeded tiny model does not emit EOS this early"
    assert longer[:6] == tokens, "greedy decoding with a KV cache is deterministic"
    deltas = list(vlm.generate_stream(parts, max_new_tokens=6))
    assert all(isinstance(d, str) and d for d in deltas)
    # Whole characters only: bytes of a character the sixth token left unfinished are dropped.
    assert "".join(deltas) == vlm.tokenizer.decode(tokens, skip_special_tokens=True).rstrip("\ufffd")
    # The first greedy token is the argmax of the prefill logits.
    assert tokens[0] == int(vlm.next_token_logits(parts).argmax())


def test_generate_stream_stops_at_the_deadline(tiny_qwen):
    parts = [TextPart("Describe everything you saw today in detail.")]
    assert list(tiny_qwen.generate_stream(parts, max_new_tokens=50, deadline_s=time.monotonic() - 1.0)) == []
    budget_s = 0.3
    started = time.monotonic()
    tokens = list(tiny_qwen.generate_tokens(parts, max_new_tokens=1_000_000, deadline_s=started + budget_s))
    elapsed = time.monotonic() - started
    assert 0 < len(tokens) < 1_000_000
    # A generous bound: it must stop near the deadline, not after a million tokens.
    assert elapsed < budget_s + 10.0


def test_prompt_text_cannot_inject_placeholders_and_summary_tokens_are_placed(tiny_qwen, frames):
    encoded = tiny_qwen.encode_frames(frames[:1])
    full = full_part(encoded.tokens[0], encoded.grid)
    part = VisualPart(full.tokens[:5], full.frame[:5], full.row[:5], full.col[:5])
    summary = VisualPart(
        tokens=encoded.tokens[0, :1],
        frame=torch.zeros(1, dtype=torch.int32),
        row=torch.full((1,), -1, dtype=torch.int16),
        col=torch.full((1,), -1, dtype=torch.int16),
    )
    injected = TextPart("a user typed <|image_pad|> and <|im_end|> here ")
    logits = tiny_qwen.next_token_logits([injected, part, summary])
    assert torch.isfinite(logits).all()
    ids = tiny_qwen.prompt_ids([injected, part, summary])
    assert int((ids == tiny_qwen.model.config.image_token_id).sum()) == 2
    with pytest.raises(ValueError, match="channels"):
        tiny_qwen.next_token_logits(
            [VisualPart(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2), torch.zeros(2))]
        )


# --------------------------------------------------------------------------- embedder


def test_embedder_vectors_are_normalised_and_distinct(tiny_embedder: Embedder, frames):
    images = tiny_embedder.embed_images(frames)
    texts = tiny_embedder.embed_text(["a red car on the road", "a person opens the door", ""])
    assert images.shape == (frames.shape[0], tiny_embedder.dim)
    assert texts.shape == (3, tiny_embedder.dim)
    assert images.dtype == texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(texts[0], texts[1])
    assert not np.allclose(images[0], images[-1])
    np.testing.assert_allclose(tiny_embedder.embed_images(frames[1:2])[0], images[1], atol=1e-5)
    assert tiny_embedder.embed_text([]).shape == (0, tiny_embedder.dim)
