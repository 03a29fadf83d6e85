"""The icetk id layout, round trips and mask handling of model/tokenizer.py."""

from __future__ import annotations

import pytest

from model.config import EOD_ID, EOP_ID, EOS_ID, GMASK_ID, MASK_ID, SMASK_ID, SOP_ID
from model.tokenizer import (
    DATA_DIR,
    DEMO_CORPORA,
    GLMTokenizer,
    NUM_IMAGE_TOKENS,
    demo_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tok() -> GLMTokenizer:
    return demo_tokenizer()


# ---- id layout ---------------------------------------------------------------------
def test_text_ids_are_sentencepiece_ids_plus_20000(tok):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=tok.proto)
    text = "The scheduler admits 多个请求 at once."
    assert tok.encode(text) == [i + 20000 for i in sp.encode(text)]
    assert NUM_IMAGE_TOKENS == 20000


def test_meta_pieces_match_icetk(tok):
    assert [tok.id_to_piece(20000 + i) for i in range(5)] == ["<unk>", "<s>", "</s>", "<pad>", "<n>"]
    assert tok.eos_id == EOS_ID == 20002
    assert tok.special_tokens["eos"] == 20002


def test_special_ids_in_official_order(tok):
    names = ["[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK"]
    assert [tok.special_tokens[n] for n in names] == list(range(150000, 150008))
    assert (MASK_ID, GMASK_ID, SMASK_ID, EOD_ID, SOP_ID, EOP_ID) == tuple(range(150000, 150006))
    assert (tok.sop_id, tok.eop_id) == (150004, 150005)
    assert tok.vocab_size == 150008
    assert tok.id_to_piece(150001) == "[[gMASK]]"
    assert tok.id_to_piece(7) == "<image_7>"


def test_demo_text_ids_stay_far_below_specials(tok):
    assert 1000 < tok.num_text_tokens <= 4000
    corpus = (DATA_DIR / DEMO_CORPORA[1]).read_text(encoding="utf-8")
    assert max(tok.encode(corpus)) < NUM_IMAGE_TOKENS + tok.num_text_tokens < 30000


def test_is_valid_id(tok):
    last_text = NUM_IMAGE_TOKENS + tok.num_text_tokens - 1
    for good in (20000, 20002, last_text, 150000, 150007):
        assert tok.is_valid_id(good), good
    for bad in (-1, 0, 19999, last_text + 1, 149999, 150008, 150528):
        assert not tok.is_valid_id(bad), bad


# ---- round trips -------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "Hello World! I am a tokenizer.",
        "今天天气很好。我们去公园散步吧",
        "GPU 显存有限, so the batch size matters: 2048 tokens.",
        "Emoji survive through byte fallback 😀🚀 and 龘.",
    ],
)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(tok.is_valid_id(i) and i < 150000 for i in ids)
    assert tok.decode(ids) == text


def test_unknown_characters_use_byte_pieces_not_unk(tok):
    assert 20000 not in tok.encode("😀🚀龘")


def test_nfkc_normalization_like_ice_text_model(tok):
    # Full-width punctuation folds to ASCII, spaces collapse (icetk's nmt_nfkc model).
    assert tok.decode(tok.encode("你好，世界！")) == "你好,世界!"
    assert tok.decode(tok.encode("a   b")) == "a b"


def test_newline_default_becomes_space(tok):
    # GLM calls icetk encode with ignore_linebreak=True: "\n" is normalized to a space.
    ids = tok.encode("line one\nline two")
    assert tok.decode(ids) == "line one line two"
    assert tok.encode("line one\nline two") == tok.encode("line one line two")


def test_newline_kept_with_linebreak_piece(tok):
    ids = tok.encode("line one\nline two", ignore_linebreak=False)
    assert 20004 in ids  # "<n>" is a user-defined piece
    assert tok.decode(ids) == "line one\nline two"
    # decode maps a literal "<n>" piece back to a newline, as icetk does
    assert tok.decode(tok.encode("a<n>b")) == "a\nb"


def test_decode_renders_specials_like_detokenize(tok):
    ids = [GMASK_ID, *tok.encode("hi there"), SOP_ID, *tok.encode("ok"), EOP_ID, EOS_ID]
    assert tok.decode(ids) == "[[gMASK]]hi there[sop]ok[eop][</s>]"
    assert tok.decode([150006, 150007]) == "[ENC][dBLOCK]"
    assert tok.decode([]) == ""


@pytest.mark.parametrize("bad", [0, 19999, 149999, 150008])
def test_decode_rejects_ids_outside_the_vocabulary(tok, bad):
    with pytest.raises(ValueError, match=str(bad)):
        tok.decode([*tok.encode("hi"), bad])


# ---- tokenize with mask markers ----------------------------------------------------
def test_tokenize_inserts_mask_ids(tok):
    ids = tok.tokenize("北京是[MASK]的首都, and [gMASK]")
    assert ids == tok.encode("北京是") + [MASK_ID] + tok.encode("的首都, and ") + [GMASK_ID]
    assert tok.tokenize("[sMASK]x") == [SMASK_ID] + tok.encode("x")
    assert tok.tokenize("[MASK][gMASK]") == [MASK_ID, GMASK_ID]


def test_tokenize_without_markers_is_encode(tok):
    text = "No masks here [xMASK] [mask]."
    assert tok.tokenize(text) == tok.encode(text)
    assert tok.tokenize("") == []


# ---- files and training ------------------------------------------------------------
def test_save_and_load_round_trip(tok, tmp_path):
    path = tmp_path / "ice_text.model"
    tok.save(path)
    loaded = GLMTokenizer.from_file(path)
    assert loaded.proto == tok.proto
    text = "Binary search halves the range. 二分查找"
    assert loaded.encode(text) == tok.encode(text)


def test_from_file_missing(tmp_path):
    path = tmp_path / "nope" / "ice_text.model"
    with pytest.raises(ValueError, match="ice_text.model"):
        GLMTokenizer.from_file(path)


def test_from_file_directory(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        GLMTokenizer.from_file(tmp_path)


@pytest.mark.parametrize("content", [b"", b"this is not a sentencepiece model", b"\xff" * 64])
def test_from_file_not_sentencepiece(tmp_path, content):
    path = tmp_path / "ice_text.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        GLMTokenizer.from_file(path)


def test_training_is_deterministic():
    lines = (DATA_DIR / DEMO_CORPORA[0]).read_text(encoding="utf-8").splitlines()
    first = train_tokenizer(lines, vocab_size=800)
    second = train_tokenizer(list(lines), vocab_size=800)
    assert first.proto == second.proto


def test_training_rejects_empty_input():
    with pytest.raises(ValueError):
        train_tokenizer(["", "  "])


def test_demo_tokenizer_is_cached():
    assert demo_tokenizer() is demo_tokenizer()


def test_lenient_decode_renders_non_text_ids():
    tok = demo_tokenizer()
    ids = tok.encode("hello") + [5, 150500] + tok.encode("world")
    with pytest.raises(ValueError):
        tok.decode(ids)
    text = tok.decode(ids, strict=False)
    assert "<image_5>" in text and "<id_150500>" in text
    assert text.startswith(tok.decode(tok.encode("hello")))
