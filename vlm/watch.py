"""Scoring watches: P(yes) of a yes/no question about a chunk, from the first answer token.

The naive, correct form: one prefill (``VisionLanguageModel.next_token_logits``) per question,
no free generation, and P(yes) = P(yes variants) / (P(yes variants) + P(no variants)) at the first
answer token. (A version that shares the context's prefill between questions, the ReKV idea,
replaces this body behind the same signature.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from vlm.types import PromptPart, TextPart

if TYPE_CHECKING:
    from vlm.models import VisionLanguageModel

# Words whose first token counts as the answer (with and without a leading space: byte-level BPE
# tokenizers give " yes" and "yes" different ids).
YES_WORDS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_WORDS = ("no", "No", "NO", " no", " No", " NO")
INSTRUCTION = "Answer with yes or no only."


def question_part(question: str) -> TextPart:
    """The text after the context that asks one watch's question."""
    return TextPart(f"Question: {question.strip()} {INSTRUCTION}\nAnswer:")


def _first_ids(tokenizer: Any, words: tuple[str, ...]) -> frozenset[int]:
    return frozenset(int(ids[0]) for w in words if (ids := tokenizer(w, add_special_tokens=False)["input_ids"]))


def answer_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """(yes ids, no ids): first tokens of the yes/no variants; an id in both counts for neither."""
    yes, no = _first_ids(tokenizer, YES_WORDS), _first_ids(tokenizer, NO_WORDS)
    both = yes & no
    if not yes - both or not no - both:
        raise ValueError("the tokenizer has no distinct first token for yes and no")
    return sorted(yes - both), sorted(no - both)


def yes_probability(logits: torch.Tensor, yes: Sequence[int], no: Sequence[int]) -> float:
    """logits [V] of the first answer token → P(yes) normalised over the yes and no ids."""
    pick = logits.float()
    log_yes = torch.logsumexp(pick[list(yes)], dim=0)
    log_no = torch.logsumexp(pick[list(no)], dim=0)
    return float(torch.sigmoid(log_yes - log_no))  # = e^yes / (e^yes + e^no)


def yes_probabilities(
    vlm: VisionLanguageModel,
    context: Sequence[PromptPart],
    questions: Sequence[str],
    *,
    reuse_prefix: bool = True,
    max_batch: int = 16,
) -> list[float]:
    """P(yes) in [0, 1] for each question about ``context`` (one chunk's parts), in order.

    ``reuse_prefix`` and ``max_batch`` are accepted for the prefix-sharing version; this one runs
    one prefill per question. Blocking (model calls): run it off the event loop.
    """
    if not questions:
        return []
    yes, no = answer_ids(vlm.tokenizer)
    return [yes_probability(vlm.next_token_logits([*context, question_part(q)]), yes, no) for q in questions]
