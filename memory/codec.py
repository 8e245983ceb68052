"""Versioned, self-describing bytes for a CompressedChunk (pure; no I/O).

Layout of version 1 (little-endian), all sizes in the header so a payload decodes on its own:

    header   "<4sBBHIIHHI": magic b"VGTK", version, precision (0 fp16, 1 int8), reserved (0),
             M tokens, C channels, grid rows, grid cols, n_input
    arrays   t_first f64[M], t_last f64[M], frame i32[M], row i16[M], col i16[M], count i32[M],
             kind i8[M], segment i16[M]
    tokens   fp16: f16[M, C]
             int8: scale f32[C] (per channel, max |x| / 127), then i8[M, C]
    trailer  CRC-32 (u32) of everything before it

The decoder switches on the version, so a new layout gets a new number and a new branch while
old payloads (tests/data/codec_v1.bin is a frozen v1 payload) keep decoding. Any corrupt,
truncated or foreign payload raises `CodecError`, never a numpy or struct error.
"""

from __future__ import annotations

import struct
import zlib
from typing import Literal

import numpy as np
import torch

from memory.types import PROVENANCE_DTYPES, CompressedChunk

MAGIC = b"VGTK"
VERSION = 1
Precision = Literal["fp16", "int8"]
_PRECISION_CODES: dict[str, int] = {"fp16": 0, "int8": 1}
_HEADER = struct.Struct("<4sBBHIIHHI")
_CRC = struct.Struct("<I")
# int8 symmetric quantisation: the largest magnitude of a channel maps to this code.
_INT8_MAX = 127.0
_FP16_MAX = float(np.finfo(np.float16).max)

# Provenance arrays in payload order with their little-endian numpy dtype (the order is part of v1).
_V1_ARRAYS: tuple[tuple[str, str], ...] = (
    ("t_first", "<f8"),
    ("t_last", "<f8"),
    ("frame", "<i4"),
    ("row", "<i2"),
    ("col", "<i2"),
    ("count", "<i4"),
    ("kind", "i1"),
    ("segment", "<i2"),
)


class CodecError(ValueError):
    """A payload that is not a valid encoded chunk (corrupt, truncated, unknown version)."""


def encode_chunk(chunk: CompressedChunk, precision: Precision = "fp16") -> bytes:
    """Serialise `chunk`; tokens [M, C] are stored as fp16, or int8 with per-channel scales."""
    if precision not in _PRECISION_CODES:
        raise ValueError(f"precision must be one of {sorted(_PRECISION_CODES)}, got {precision!r}")
    m, c = chunk.tokens.shape
    rows, cols = chunk.grid
    parts = [_HEADER.pack(MAGIC, VERSION, _PRECISION_CODES[precision], 0, m, c, rows, cols, chunk.n_input)]
    for name, np_dtype in _V1_ARRAYS:
        parts.append(getattr(chunk, name).numpy().astype(np_dtype, copy=False).tobytes())
    feats = chunk.tokens.detach().float().numpy()  # [M, C]
    if not np.isfinite(feats).all():
        raise ValueError("tokens must be finite (NaN or inf cannot be stored)")
    if precision == "fp16":
        if m and float(np.abs(feats).max()) > _FP16_MAX:
            raise ValueError("tokens do not fit fp16 (|x| > 65504): use precision='int8'")
        half = feats.astype("<f2")
        parts.append(half.tobytes())
    else:
        peak = np.abs(feats).max(axis=0) if m else np.zeros(c, dtype=np.float32)  # [C]
        scale = np.where(peak > 0, peak / _INT8_MAX, 1.0).astype("<f4")  # [C]; an all-zero channel stays 0
        q = np.clip(np.rint(feats / scale), -_INT8_MAX, _INT8_MAX).astype("i1")  # [M, C]
        parts.extend([scale.tobytes(), q.tobytes()])
    body = b"".join(parts)
    return body + _CRC.pack(zlib.crc32(body))


def decode_chunk(payload: bytes) -> CompressedChunk:
    """Inverse of `encode_chunk` for every version so far; tokens come back as float32."""
    view = memoryview(payload)
    if len(view) < _HEADER.size + _CRC.size:
        raise CodecError(
            f"payload of {len(view)} bytes is shorter than a header ({_HEADER.size + _CRC.size} bytes)"
        )
    magic, version = bytes(view[:4]), view[4]
    if magic != MAGIC:
        raise CodecError(f"not a vigil token payload: magic {magic!r}, expected {MAGIC!r}")
    if version == 1:
        return _decode_v1(view)
    raise CodecError(f"unsupported payload version {version} (this build reads versions 1..{VERSION})")


def _decode_v1(view: memoryview) -> CompressedChunk:
    (crc,) = _CRC.unpack(view[-_CRC.size :])
    body = view[: -_CRC.size]
    if zlib.crc32(body) != crc:
        raise CodecError("payload checksum mismatch: the bytes are corrupt or truncated")
    _, _, prec, _, m, c, rows, cols, n_input = _HEADER.unpack(body[: _HEADER.size])
    if prec not in _PRECISION_CODES.values():
        raise CodecError(f"unknown precision code {prec}")
    token_bytes = m * c * 2 if prec == 0 else c * 4 + m * c
    array_bytes = sum(m * np.dtype(dt).itemsize for _, dt in _V1_ARRAYS)
    expected = _HEADER.size + array_bytes + token_bytes
    if len(body) != expected:
        raise CodecError(f"payload body is {len(body)} bytes, header describes {expected} (M={m}, C={c})")
    offset = _HEADER.size
    arrays: dict[str, torch.Tensor] = {}
    for name, np_dtype in _V1_ARRAYS:
        size = m * np.dtype(np_dtype).itemsize
        values = np.frombuffer(body[offset : offset + size], dtype=np_dtype)
        arrays[name] = torch.from_numpy(values.astype(np_dtype, copy=True)).to(PROVENANCE_DTYPES[name])
        offset += size
    if prec == 0:
        feats = np.frombuffer(body[offset:], dtype="<f2").reshape(m, c).astype(np.float32)
    else:
        scale = np.frombuffer(body[offset : offset + c * 4], dtype="<f4")
        q = np.frombuffer(body[offset + c * 4 :], dtype="i1").reshape(m, c)
        feats = q.astype(np.float32) * scale[None, :]
    try:
        return CompressedChunk(tokens=torch.from_numpy(feats), grid=(rows, cols), n_input=n_input, **arrays)
    except ValueError as exc:  # e.g. a zero grid: consistent bytes, impossible content
        raise CodecError(f"payload decodes to an invalid chunk: {exc}") from exc
