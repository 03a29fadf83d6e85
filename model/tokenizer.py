"""The GLM-130B tokenizer: icetk's id layout re-implemented over ``sentencepiece``.

icetk (THUDM/icetk, ``icetk/ice_tokenizer.py`` and ``icetk/text_tokenizer.py``) wraps a
SentencePiece model, ``ice_text.model``, and GLM-130B's wrapper (SwissArmyTransformer,
``tokenization/icetk_glm_130B/ice_tokenizer.py``) adds special ids on top. The layout
(``docs/model.md`` "Special tokens"):

    [0, 20000)              image tokens; never produced by ``encode``
    [20000, 20000 + n)      text: SentencePiece id + 20000 (n = SentencePiece vocab size)
    150000 + i              special i of [MASK] [gMASK] [sMASK] eod sop eop ENC dBLOCK
    20002                   eos, which is SentencePiece ``</s>`` (id 2) + 20000

Behaviour copied from the official code:

* ``encode`` is icetk ``encode(text)`` with GLM's default ``ignore_linebreak=True``: ``\\n``
  is handed to SentencePiece unchanged, and the normalizer turns it into a space.
  ``ignore_linebreak=False`` first replaces ``\\n`` with the ``<n>`` piece.
* ``decode`` is the GLM wrapper's ``detokenize``: runs of text ids go through icetk
  ``decode`` (which maps ``<n>`` back to ``\\n``); every special id, eos included, is
  rendered as ``"[" + name + "]"``, so gMASK prints as ``[[gMASK]]`` and eos as ``[</s>]``.
  Ids that are neither text nor special (image ids such as the pad id 0, unused ids) make
  SentencePiece raise in icetk; here they raise ``ValueError``.
* ``tokenize`` is the prompt handling of GLM-130B ``generate.py``: split on
  ``\\[[sg]?MASK\\]``, encode each piece separately, put the mask id between pieces. It does
  not append a generation mask; that is the caller's policy.

Normalization: the real ``ice_text.model`` folds full-width punctuation into ASCII (the
wrapper's ``sentence_end_decoder`` names 20035 '！' while icetk's README encodes ASCII '!'
as 20035), i.e. it uses SentencePiece's default ``nmt_nfkc`` rule, which also collapses
runs of spaces and turns ``\\n`` into a space. ``train_tokenizer`` uses the same rule by
default, so round trips are exactly as lossy as icetk's; pass ``normalization="identity"``
for a lossless toy tokenizer. ``byte_fallback`` lets characters outside the trained
vocabulary (emoji, rare CJK) survive as UTF-8 byte pieces.
"""

from __future__ import annotations

import io
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from model.config import EOD_ID, EOP_ID, EOS_ID, GMASK_ID, MASK_ID, SMASK_ID, SOP_ID

NUM_IMAGE_TOKENS = 20000  # icetk: text ids start after the image codebook
SPECIAL_BASE = 150000  # GLM wrapper: num_tokens, hard-coded
SPECIAL_NAMES = ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")
EOS_PIECE = "</s>"
LINEBREAK_PIECE = "<n>"
MASK_PATTERN = re.compile(r"\[[sg]?MASK\]")
MAX_SP_VOCAB = SPECIAL_BASE - NUM_IMAGE_TOKENS  # text ids must stay below the specials

DATA_DIR = Path(__file__).resolve().parent / "data"
DEMO_CORPORA = ("corpus_en.txt", "corpus_zh.txt")
DEMO_VOCAB_SIZE = 2000

# The config constants and the wrapper's order must agree (docs/model.md "Special tokens").
assert [MASK_ID, GMASK_ID, SMASK_ID, EOD_ID, SOP_ID, EOP_ID] == [
    SPECIAL_BASE + SPECIAL_NAMES.index(n) for n in ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop")
]


class GLMTokenizer:
    """A SentencePiece model seen through the GLM-130B id layout."""

    def __init__(self, processor: spm.SentencePieceProcessor, proto: bytes, source: str = "<proto>"):
        n = processor.get_piece_size()
        if n > MAX_SP_VOCAB:
            raise ValueError(f"{source}: sentencepiece vocab of {n} would overlap the special ids")
        if n <= 2 or processor.id_to_piece(2) != EOS_PIECE:
            raise ValueError(f"{source}: sentencepiece id 2 must be {EOS_PIECE!r} (eos = {EOS_ID})")
        self._sp = processor
        self._proto = proto
        self.special_tokens: dict[str, int] = {
            name: SPECIAL_BASE + i for i, name in enumerate(SPECIAL_NAMES)
        }
        self.special_tokens["eos"] = EOS_ID
        # As in the wrapper: eos decodes under its piece name, not under "eos".
        self._special_names = {i: name for name, i in self.special_tokens.items()}
        self._special_names[EOS_ID] = EOS_PIECE

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_proto(cls, proto: bytes, source: str = "<proto>") -> "GLMTokenizer":
        """Load a serialized SentencePiece ``ModelProto``."""
        if not isinstance(proto, (bytes, bytearray)) or not proto:
            raise ValueError(f"{source}: not a sentencepiece model (empty or not bytes)")
        try:
            processor = spm.SentencePieceProcessor(model_proto=bytes(proto))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError variants
            raise ValueError(f"{source}: not a sentencepiece model ({exc})") from None
        return cls(processor, bytes(proto), source)

    @classmethod
    def from_file(cls, path: str | Path) -> "GLMTokenizer":
        """Load ``ice_text.model`` (or any SentencePiece model file) from ``path``."""
        path = Path(path).expanduser()
        try:
            proto = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read tokenizer model ({exc.strerror or exc})") from None
        return cls.from_proto(proto, source=str(path))

    def save(self, path: str | Path) -> None:
        Path(path).expanduser().write_bytes(self._proto)

    @property
    def proto(self) -> bytes:
        return self._proto

    # ---- sizes and ids ------------------------------------------------------------
    @property
    def num_text_tokens(self) -> int:
        """SentencePiece vocabulary size (icetk ``num_text_tokens``)."""
        return self._sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        """One past the last special id (150008): the id space the model's logits cover.

        The official wrapper reports ``150000 + len(special_tokens)``; that dict also holds
        'eos', so it says 150009, one more than any id it uses."""
        return SPECIAL_BASE + len(SPECIAL_NAMES)

    eos_id = EOS_ID
    sop_id = SOP_ID
    eop_id = EOP_ID

    def is_text_id(self, token_id: int) -> bool:
        return NUM_IMAGE_TOKENS <= token_id < NUM_IMAGE_TOKENS + self.num_text_tokens

    def is_valid_id(self, token_id: int) -> bool:
        """A text id or one of the eight special ids."""
        return self.is_text_id(token_id) or SPECIAL_BASE <= token_id < self.vocab_size

    def id_to_piece(self, token_id: int) -> str:
        """icetk ``tokenizer[id]``: a SentencePiece piece, ``<image_N>`` or ``[name]``."""
        token_id = int(token_id)
        if 0 <= token_id < NUM_IMAGE_TOKENS:
            return f"<image_{token_id}>"
        if self.is_text_id(token_id):
            return self._sp.id_to_piece(token_id - NUM_IMAGE_TOKENS)
        if SPECIAL_BASE <= token_id < self.vocab_size:
            return f"[{self._special_names[token_id]}]"
        raise ValueError(f"token id {token_id} is outside the GLM vocabulary")

    # ---- text <-> ids -------------------------------------------------------------
    def encode(self, text: str, ignore_linebreak: bool = True) -> list[int]:
        """Text ids for ``text``; no special ids are produced."""
        if not ignore_linebreak:
            text = text.replace("\n", LINEBREAK_PIECE)
        return [i + NUM_IMAGE_TOKENS for i in self._sp.encode(text)]

    def _decode_text(self, ids: Sequence[int]) -> str:
        pieces = []
        for token_id in ids:
            if not self.is_text_id(token_id):
                raise ValueError(f"cannot decode token id {token_id}: not a text or special id")
            pieces.append(token_id - NUM_IMAGE_TOKENS)
        return self._sp.decode(pieces).replace(LINEBREAK_PIECE, "\n")

    def decode(self, ids: Iterable[int], *, strict: bool = True) -> str:
        """The wrapper's ``detokenize``: text runs decoded, specials shown as ``[name]``.

        ``strict=False`` renders ids that are neither text nor special (image ids,
        vocabulary padding: a model may sample them) as ``<image_N>``/``<id_N>``
        instead of raising, for showing generated output.
        """
        text, run = [], []
        for token_id in map(int, ids):
            name = self._special_names.get(token_id)
            if name is None and (strict or self.is_text_id(token_id)):
                run.append(token_id)
                continue
            text.append(self._decode_text(run))
            run = []
            if name is not None:
                text.append(f"[{name}]")
            else:
                text.append(f"<image_{token_id}>" if 0 <= token_id < NUM_IMAGE_TOKENS else f"<id_{token_id}>")
        text.append(self._decode_text(run))
        return "".join(text)

    def tokenize(self, text: str) -> list[int]:
        """Prompt ids as ``generate.py`` builds them: mask markers become mask ids."""
        segments = MASK_PATTERN.split(text)
        markers = MASK_PATTERN.findall(text)
        ids: list[int] = []
        for segment, marker in zip(segments, markers):
            ids.extend(self.encode(segment))
            ids.append(self.special_tokens[marker])
        ids.extend(self.encode(segments[-1]))
        return ids


def train_tokenizer(
    lines: Iterable[str], vocab_size: int = DEMO_VOCAB_SIZE, normalization: str = "nmt_nfkc"
) -> GLMTokenizer:
    """Train a small unigram SentencePiece model in memory with icetk's meta ids.

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): a small corpus yields
    fewer pieces. Training is single-threaded, so the same lines give the same proto."""
    sentences = [line.strip() for line in lines if line.strip()]
    if not sentences:
        raise ValueError("train_tokenizer: no non-empty lines to train on")
    if not 0 < vocab_size <= MAX_SP_VOCAB:
        raise ValueError(f"train_tokenizer: vocab_size must be in 1..{MAX_SP_VOCAB}, got {vocab_size}")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        normalization_rule_name=normalization,
        unk_id=0,  # icetk: 20000 = <unk>
        bos_id=1,
        eos_id=2,  # icetk: 20002 = </s> = eos
        pad_id=3,  # icetk: 20003 = <pad>
        user_defined_symbols=[LINEBREAK_PIECE],
        byte_fallback=True,
        num_threads=1,
        minloglevel=2,
    )
    return GLMTokenizer.from_proto(buffer.getvalue(), source="<trained>")


@lru_cache(maxsize=1)
def demo_tokenizer() -> GLMTokenizer:
    """A tokenizer trained on the English and Chinese sentences shipped in ``model/data``."""
    lines: list[str] = []
    for name in DEMO_CORPORA:
        lines.extend((DATA_DIR / name).read_text(encoding="utf-8").splitlines())
    return train_tokenizer(lines, DEMO_VOCAB_SIZE)
