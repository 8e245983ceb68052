"""Watch scoring: P(yes) of standing yes/no questions about one chunk, sharing one prefill.

A watch's score is the model's probability of "yes" against "no" at the first answer token, read
from one prefill with no free generation (NVIDIA VSS checks its alerts with a one-token yes/no
answer the same way). Each check is the chat

    system | user: <context: the chunk's text and visual tokens> INSTRUCTION <question> | assistant cue

and everything before the question is the same for every watch of a camera: the system text, the
chunk's visual tokens and the yes/no instruction. That shared prefix is run through the LLM once
and its KV cache reused by every question, which then costs only its own few tokens (the ReKV
idea of answering from cached context: Di et al., "Streaming Video Question-Answering with
In-context Video KV-Cache Retrieval", ICLR 2025). Questions continue from the cache in batches:
the cache is expanded along the batch, the suffixes (question + the template's assistant cue) are
right-padded with a padding mask, and each row's logits are read at its own last real token.
Left padding would put pad tokens between the prefix and the question, where they would change
every position after them; with right padding a pad comes after every real token of its row, so
causal attention never lets a real token see it.

The split of the templated prompt into prefix and suffix is found, not assumed: the chat is
rendered with a sentinel where the question goes, twice with different sentinels, and the two
renderings must agree outside it (the template does not transform the question), hold it once,
keep every visual placeholder before it, and tokenize the prefix the same alone as in front of a
question. A template that breaks any of these raises ``TemplateSplitError``.

``reuse_prefix=False`` is the independent baseline: each question a full prefill of the same token
sequence, one at a time. The two agree up to floating-point rounding (tests/test_watch_scoring.py);
bench/watches.py measures what the reuse saves.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache

from vlm.models import SYSTEM_PROMPT, VisionLanguageModel
from vlm.types import PromptPart, TextPart, VisualPart

# The yes/no instruction, in the shared prefix; it ends where the question's own text begins.
# The question follows after one space, a boundary at which byte-level BPE pre-tokenizers (the
# Qwen family's) always split, so prefix and question tokenize apart as they would together.
INSTRUCTION = "\nAnswer the question about the video above with yes or no.\nQuestion:"
QUESTION_SEPARATOR = " "
# Spellings an answer may start with. A tokenizer's single tokens among them are the answer's
# tokens (the real Qwen2/2.5 vocabulary has all twelve as single tokens).
YES_VARIANTS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_VARIANTS = ("no", "No", "NO", " no", " No", " NO")
# Two sentinels that stand where the question goes while the split is found: plain words (no
# reserved strings, so the template renders them as it renders a question), of different
# lengths and words, so a template that uses the question anywhere else shows it.
_SENTINELS = (" vigil watch question", " another vigil watch slot, longer")
DEFAULT_MAX_BATCH = 16


class TemplateSplitError(ValueError):
    """The chat template does not allow a shared prefix with the question after it."""


@dataclass(frozen=True, slots=True)
class AnswerIds:
    """Token ids whose probability counts as "yes" or as "no" at the first answer token."""

    yes: tuple[int, ...]
    no: tuple[int, ...]


def answer_ids(tokenizer: Any) -> AnswerIds:
    """The tokenizer's yes- and no-variant token ids (``YES_VARIANTS``, ``NO_VARIANTS``).

    Each word's variants that are one token are its ids. A small vocabulary may have none (the
    tiny test tokenizer spells "yes" as "y" + "es"); then the first token of each variant stands
    for it, less any first token that both words share (a leading space), which would count for
    both. Raises ValueError when either word is left without ids.
    """

    def ids_of(variants: Sequence[str]) -> set[int]:
        encoded = [list(tokenizer(v, add_special_tokens=False)["input_ids"]) for v in variants]
        single = {ids[0] for ids in encoded if len(ids) == 1}
        return single or {ids[0] for ids in encoded if ids}

    yes, no = ids_of(YES_VARIANTS), ids_of(NO_VARIANTS)
    shared = yes & no
    yes, no = yes - shared, no - shared
    if not yes or not no:
        raise ValueError(f"the tokenizer has no distinct first tokens for yes ({sorted(yes)}) and no ({sorted(no)})")
    return AnswerIds(tuple(sorted(yes)), tuple(sorted(no)))


def yes_probability(logits: Tensor, ids: AnswerIds) -> Tensor:
    """logits [B, V] at the first answer token → P(yes) [B] float32 in [0, 1].

    The softmax mass of the yes ids over the mass of the yes and no ids. Computed as
    sigmoid(logsumexp(yes) - logsumexp(no)) on the log-softmax: the same ratio, without the
    underflow of two small masses divided.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
    yes = torch.logsumexp(logp[:, list(ids.yes)], dim=-1)  # [B]
    no = torch.logsumexp(logp[:, list(ids.no)], dim=-1)  # [B]
    return torch.sigmoid(yes - no)


@dataclass(frozen=True, slots=True)
class WatchPrompt:
    """The shared prefix of a chunk's checks, assembled, and how each question's suffix ends."""

    embeds: Tensor  # [1, P, C] prefix inputs_embeds (system, context, instruction)
    positions: Tensor  # [1, P] or [3, 1, P] prefix position ids
    next_pos: int  # position of the first suffix token
    tail: str  # templated text after the question: end of the user turn, the assistant cue


def split_prompt(vlm: VisionLanguageModel, context: Sequence[PromptPart]) -> WatchPrompt:
    """Render the chat with the question slot and assemble the part before it (see the module doc)."""
    visuals = [p for p in context if isinstance(p, VisualPart)]
    heads, tails = [], []
    for sentinel in _SENTINELS:
        text = vlm.prompt_text([*context, TextPart(INSTRUCTION + sentinel)], SYSTEM_PROMPT)
        if text.count(sentinel) != 1:
            raise TemplateSplitError(
                f"the chat template of {vlm.name!r} renders the question slot {text.count(sentinel)} times, not once"
            )
        head, tail = text.split(sentinel)
        heads.append(head)
        tails.append(tail)
    if heads[0] != heads[1] or tails[0] != tails[1]:
        raise TemplateSplitError(
            f"the chat template of {vlm.name!r} changes the text around the question with the question itself, "
            "so no prefix is shared by every question"
        )
    head, tail = heads[0], tails[0]
    ids = vlm.tokenize(head)  # [P_ids]
    joined = vlm.tokenize(head + _SENTINELS[0])
    if not torch.equal(joined[: ids.shape[0]], ids):
        raise TemplateSplitError(
            f"the tokenizer of {vlm.name!r} merges the end of the shared prefix with the question's first token"
        )
    try:
        embeds, positions, next_pos = vlm.assemble_ids(ids, visuals)
    except ValueError as exc:  # a visual placeholder rendered after the question slot
        raise TemplateSplitError(f"the shared prefix does not hold every visual part: {exc}") from exc
    return WatchPrompt(embeds=embeds, positions=positions, next_pos=next_pos, tail=tail)


def question_ids(vlm: VisionLanguageModel, question: str, tail: str) -> Tensor:
    """A question's suffix: separator, the question's text, the template's tail → token ids [L]."""
    # The same removal of reserved strings as every prompt text: a question cannot close the turn.
    text = vlm._sanitise(question).strip()
    if not text:
        raise ValueError(f"a watch question is empty: {question!r}")
    return vlm.tokenize(QUESTION_SEPARATOR + text + tail)


def _suffix_batch(vlm: VisionLanguageModel, suffixes: Sequence[Tensor], start: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded suffixes → (embeds [B, S, C], positions [B, S] or [3, B, S], lengths [B]).

    Pads repeat the row's last id (any valid id: they are masked and come after every real
    token). Positions continue from the prefix's ``start``.
    """
    width = max(int(s.shape[0]) for s in suffixes)
    embeds, positions = [], []
    for ids in suffixes:
        padded = torch.cat([ids, ids[-1:].expand(width - ids.shape[0])])  # [S]
        row_embeds, row_positions, _ = vlm.assemble_ids(padded, [])  # [1, S, C], [1, S] or [3, 1, S]
        embeds.append(row_embeds)
        positions.append(row_positions + start)
    lengths = torch.tensor([int(s.shape[0]) for s in suffixes], device=vlm.device)  # [B]
    return torch.cat(embeds, dim=0), torch.cat(positions, dim=-2), lengths


def _expanded(cache: DynamicCache, batch: int, config: Any) -> DynamicCache:
    """A fresh cache holding ``cache``'s keys and values for each of ``batch`` rows (never aliased:
    the forward appends to the cache it is given, and the prefix's is reused by the next batch)."""
    layers = [
        (layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1))  # [B, H, P, D] each
        for layer in cache.layers
    ]
    return DynamicCache(layers, config=config)


def _cache_name(decoder: torch.nn.Module) -> str:
    """The decoder's keyword (and output field) for its KV cache.

    transformers 5.24 renamed ``past_key_values`` to ``cache`` and warns on the old name; 5.23,
    the lowest version vigil admits (docs/install.md), knows only the old one.
    """
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def _score_reusing(
    vlm: VisionLanguageModel, prompt: WatchPrompt, suffixes: Sequence[Tensor], ids: AnswerIds, max_batch: int
) -> list[float]:
    """One prefill of the prefix, then the suffixes from its cache, ``max_batch`` at a time.

    Batches are formed in order of suffix length, so that a batch's rows need little padding
    (every pad token is computed like a real one); scores go back in the questions' order.
    """
    decoder = vlm.model.get_decoder()
    head = vlm.model.get_output_embeddings()
    cache = _cache_name(decoder)
    out = decoder(inputs_embeds=prompt.embeds, position_ids=prompt.positions, use_cache=True)
    prefix = getattr(out, cache)  # per layer keys and values [1, H, P, D]
    p = prompt.embeds.shape[1]
    by_length = sorted(range(len(suffixes)), key=lambda i: int(suffixes[i].shape[0]))
    scores = [0.0] * len(suffixes)
    for first in range(0, len(suffixes), max_batch):
        rows = by_length[first : first + max_batch]
        batch = [suffixes[i] for i in rows]
        embeds, positions, lengths = _suffix_batch(vlm, batch, prompt.next_pos)  # [B, S, C], [.., B, S], [B]
        b, s = embeds.shape[:2]
        real = torch.arange(s, device=vlm.device)[None] < lengths[:, None]  # [B, S]
        mask = torch.cat([torch.ones(b, p, dtype=torch.bool, device=vlm.device), real], dim=1).long()  # [B, P + S]
        hidden = decoder(
            inputs_embeds=embeds,
            position_ids=positions,
            attention_mask=mask,
            use_cache=True,
            **{cache: _expanded(prefix, b, decoder.config)},
        ).last_hidden_state  # [B, S, C]
        last = hidden[torch.arange(b, device=vlm.device), lengths - 1]  # [B, C]: each row's own last token
        for row, score in zip(rows, yes_probability(head(last), ids).tolist(), strict=True):  # logits [B, V] → [B]
            scores[row] = score
    return scores


def _score_alone(
    vlm: VisionLanguageModel, prompt: WatchPrompt, suffixes: Sequence[Tensor], ids: AnswerIds
) -> list[float]:
    """The baseline: each question a full prefill of prefix + suffix, nothing cached."""
    decoder = vlm.model.get_decoder()
    head = vlm.model.get_output_embeddings()
    scores: list[float] = []
    for suffix in suffixes:
        embeds, positions, _ = _suffix_batch(vlm, [suffix], prompt.next_pos)  # [1, L, C], [.., 1, L]
        hidden = decoder(
            inputs_embeds=torch.cat([prompt.embeds, embeds], dim=1),  # [1, P + L, C]
            position_ids=torch.cat([prompt.positions, positions], dim=-1),  # [1, P + L] or [3, 1, P + L]
            use_cache=False,
        ).last_hidden_state  # [1, P + L, C]
        scores += yes_probability(head(hidden[:, -1]), ids).tolist()  # logits [1, V] → [1]
    return scores


@torch.inference_mode()
def yes_probabilities(
    vlm: VisionLanguageModel,
    context: Sequence[PromptPart],
    questions: Sequence[str],
    *,
    reuse_prefix: bool = True,
    max_batch: int = DEFAULT_MAX_BATCH,
) -> list[float]:
    """P(yes) in [0, 1] for each question about ``context`` (the chunk's TextPart/VisualPart parts).

    context: the user turn before the instruction (VisualPart tokens [M, C], C = ``vlm.hidden_size``);
    questions: Q standing yes/no questions → Q scores, in order. With ``reuse_prefix`` the shared
    prefix is prefilled once and the questions continue from its KV cache, ``max_batch`` at a
    time; without it each question is a full prefill (the baseline). One prefill per question
    either way, no generation. Raises ValueError for an empty question or ``max_batch`` < 1,
    TemplateSplitError when the chat template allows no shared prefix.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    if not questions:
        return []
    ids = answer_ids(vlm.tokenizer)
    prompt = split_prompt(vlm, context)
    suffixes = [question_ids(vlm, q, prompt.tail) for q in questions]  # Q x [L_q]
    if reuse_prefix:
        return _score_reusing(vlm, prompt, suffixes, ids, max_batch)
    return _score_alone(vlm, prompt, suffixes, ids)
