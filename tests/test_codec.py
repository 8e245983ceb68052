"""Token codec: round trips, the frozen v1 payload, and corrupt input."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memory.codec import CodecError, decode_chunk, encode_chunk
from memory.types import CompressedChunk, TokenKind

V1_FIXTURE = Path(__file__).parent / "data" / "codec_v1.bin"


def make_chunk(m: int, c: int, seed: int, scale: float = 1.0) -> CompressedChunk:
    g = torch.Generator().manual_seed(seed)
    t_first = 1_763_600_000.25 + torch.arange(m, dtype=torch.float64) * 0.5
    return CompressedChunk(
        tokens=torch.randn(m, c, generator=g) * scale,
        t_first=t_first,
        t_last=t_first + 1.0,
        frame=torch.arange(m, dtype=torch.int32) % 8,
        row=(torch.arange(m, dtype=torch.int16) % 14) - (torch.arange(m) == m - 1).to(torch.int16) * 15,
        col=torch.arange(m, dtype=torch.int16) % 13,
        count=torch.randint(0, 500, (m,), generator=g, dtype=torch.int32),
        kind=torch.randint(0, len(TokenKind), (m,), generator=g).to(torch.int8),
        segment=torch.arange(m, dtype=torch.int16) // 4,
        grid=(14, 14),
        n_input=8 * 196,
    )


def assert_same_provenance(a: CompressedChunk, b: CompressedChunk) -> None:
    for name in ("t_first", "t_last", "frame", "row", "col", "count", "kind", "segment"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.grid == b.grid
    assert a.n_input == b.n_input


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 40), st.sampled_from([1, 8, 64]), st.integers(0, 1000), st.sampled_from([0.01, 1.0, 300.0]))
def test_fp16_and_int8_round_trips(m, c, seed, scale):
    chunk = make_chunk(m, c, seed, scale)
    half = decode_chunk(encode_chunk(chunk, "fp16"))
    assert_same_provenance(chunk, half)
    assert half.tokens.dtype == torch.float32
    torch.testing.assert_close(half.tokens, chunk.tokens.half().float(), rtol=0, atol=0)
    quant = decode_chunk(encode_chunk(chunk, "int8"))
    assert_same_provenance(chunk, quant)
    if m:
        # Symmetric per-channel int8: the error is at most half a step of the channel's scale.
        step = chunk.tokens.abs().amax(dim=0) / 127.0  # [C]
        assert bool(((quant.tokens - chunk.tokens).abs() <= step * 0.5 + 1e-6).all())


def test_payload_sizes_are_what_storage_planning_assumes():
    chunk = make_chunk(20, 896, seed=1)
    fp16, int8 = encode_chunk(chunk, "fp16"), encode_chunk(chunk, "int8")
    assert 20 * 896 * 2 < len(fp16) < 20 * 896 * 2 + 1024
    assert 20 * 896 + 896 * 4 < len(int8) < 20 * 896 + 896 * 4 + 1024  # int8 codes + fp32 scales


@pytest.mark.parametrize(("m", "c"), [(0, 8), (1, 64), (37, 896)])
def test_overhead_is_the_documented_28_plus_31_per_token(m, c):
    # docs/compression.md, section 3 (it said 28 + 25·M + 4 before issue 7).
    chunk = make_chunk(m, c, seed=2)
    assert len(encode_chunk(chunk, "fp16")) == 28 + 31 * m + 2 * m * c
    assert len(encode_chunk(chunk, "int8")) == 28 + 31 * m + m * c + 4 * c


def test_frozen_v1_payload_still_decodes():
    assert V1_FIXTURE.exists(), f"{V1_FIXTURE} is missing: it is a frozen v1 payload and must be kept in git"
    decoded = decode_chunk(V1_FIXTURE.read_bytes())
    expected = make_chunk(6, 8, seed=7)
    assert_same_provenance(expected, decoded)
    torch.testing.assert_close(decoded.tokens, expected.tokens.half().float(), rtol=0, atol=0)


def test_corrupt_truncated_and_foreign_payloads_raise_codec_error():
    payload = bytearray(encode_chunk(make_chunk(5, 16, seed=2)))
    flipped = payload.copy()
    flipped[60] ^= 0x40
    for bad, message in (
        (bytes(flipped), "checksum"),
        (bytes(payload[:-7]), "checksum"),
        (bytes(payload[:10]), "shorter than a header"),
        (b"", "shorter than a header"),
        (b"RIFF" + bytes(payload[4:]), "magic"),
        (bytes(payload[:4]) + b"\x09" + bytes(payload[5:]), "unsupported payload version 9"),
    ):
        with pytest.raises(CodecError, match=message):
            decode_chunk(bad)


def test_consistent_header_with_wrong_sizes_is_rejected():
    # A payload whose checksum is right but whose header lies about M: built by hand.
    body = bytearray(encode_chunk(make_chunk(3, 4, seed=3))[:-4])
    struct.pack_into("<I", body, 8, 4)  # M = 4 instead of 3
    with pytest.raises(CodecError, match="header describes"):
        decode_chunk(bytes(body) + struct.pack("<I", zlib.crc32(body)))


def test_tokens_too_large_for_fp16_are_refused_not_stored_as_inf():
    with pytest.raises(ValueError, match="fp16"):
        encode_chunk(make_chunk(2, 4, seed=4, scale=1e6), "fp16")
    big = make_chunk(2, 4, seed=4, scale=1e6)
    torch.testing.assert_close(decode_chunk(encode_chunk(big, "int8")).tokens, big.tokens, rtol=0.01, atol=1e6 / 127)
