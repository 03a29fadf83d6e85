"""How a GLM prompt becomes model inputs: which mask is filled, positions, splicing.

Follows the official ``generate.py`` (``docs/model.md`` "Positions", "Generation"): the generation mask
is ``[MASK]`` if present, else ``[sMASK]``, else ``[gMASK]``; the input is
``context + [sop]``; context tokens take positions ``0..n-2``; with ``[MASK]``
or ``[sMASK]`` sop and every generated token take the mask's index, with
``[gMASK]`` positions keep counting.

Blanks are the masks of the prompt itself: the next blank is the first mask at or
after ``Blank.end`` of the one just filled (``next_blank``), so a mask id the model
generated inside a blank is content, never a new blank, and a request fills at most
as many blanks as its prompt holds (``check_blanks``: ``model.limits.MAX_BLANKS``).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import EOS_ID, GMASK_ID, MASK_ID, SMASK_ID, SOP_ID
from model.limits import blanks_problem


class PromptError(ValueError):
    """A prompt the model cannot run; the message names the problem."""


def generation_mask(ids: list[int]) -> int | None:
    """The mask id the official code fills in ``ids``, or None when there is none."""
    for mask in (MASK_ID, SMASK_ID, GMASK_ID):
        if mask in ids:
            return mask
    return None


def prepare_text_ids(ids: list[int]) -> list[int]:
    """The official wrapping of a tokenized text prompt: append ``[gMASK]`` when it
    holds no mask, then ``eos`` when it does not end with a mask."""
    ids = list(ids)
    if generation_mask(ids) is None:
        ids.append(GMASK_ID)
    if ids[-1] not in (MASK_ID, SMASK_ID, GMASK_ID):
        ids.append(EOS_ID)
    return ids


@dataclass(frozen=True)
class Blank:
    """One generation phase: ``context`` (with its masks) + ``sop``, filling ``mask_pos``."""

    context: tuple[int, ...]
    mask_pos: int
    use_gmask: bool

    @classmethod
    def first(cls, ids: list[int], mask: int | None = None, start: int = 0) -> "Blank":
        """The first ``mask`` (the generation mask by default) at or after index ``start``."""
        mask = generation_mask(ids) if mask is None else mask
        if mask is None or mask not in ids[start:]:
            raise PromptError("prompt holds no mask id ([MASK] 150000, [sMASK] 150002 or [gMASK] 150001)")
        return cls(tuple(ids), ids.index(mask, start), mask == GMASK_ID)

    @property
    def input_ids(self) -> list[int]:
        return list(self.context) + [SOP_ID]

    @property
    def context_length(self) -> int:
        return len(self.context)

    def position(self, generated: int) -> int:
        """Position id of sop (``generated == 0``) or of the token after ``generated`` new ones."""
        if self.use_gmask:
            return self.context_length + generated
        return self.mask_pos

    def context_positions(self) -> list[int]:
        return list(range(self.context_length))

    def splice(self, generated: list[int]) -> list[int]:
        """The context with the mask replaced by ``generated`` (official ``fill_blanks``)."""
        ctx = list(self.context)
        return ctx[: self.mask_pos] + list(generated) + ctx[self.mask_pos + 1:]

    def end(self, generated: list[int]) -> int:
        """Index in ``splice(generated)`` just past the filled content: where the next blank
        is searched from (a mask id inside ``generated`` is not a blank)."""
        return self.mask_pos + len(generated)


def next_blank(ids: list[int], mask: int, start: int) -> Blank | None:
    """The blank after index ``start`` (None when no ``mask`` is left there)."""
    return Blank.first(ids, mask, start) if mask in ids[start:] else None


def check_blanks(ids: list[int]) -> None:
    """Refuse a prompt with more blanks to fill than ``model.limits.MAX_BLANKS``."""
    mask = generation_mask(ids)
    problem = blanks_problem(ids.count(mask)) if mask is not None else ""
    if problem:
        raise PromptError(f"prompt {problem}")


def check_length(ids: list[int], max_sequence_length: int) -> None:
    """The official limit: context + sop must fit ``max_sequence_length``."""
    if len(ids) + 1 > max_sequence_length:
        raise PromptError(
            f"prompt is too long: {len(ids)} tokens + sop exceeds max_sequence_length {max_sequence_length}"
        )


def check_ids(ids: list[int], vocab_size: int) -> None:
    if not ids:
        raise PromptError("prompt is empty")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise PromptError(f"unknown token id {t} at index {i}: outside the vocabulary [0, {vocab_size})")
