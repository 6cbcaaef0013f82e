"""Tokenizers: fixed special ids, book-compatible word splitting, natural decoding, BPE, files."""

from __future__ import annotations

import json
import time

import pytest
from tokenizers import Tokenizer as HFTokenizer

from scriven.errors import ScrivenError
from scriven.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK,
    UNK_ID,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordTokenizer,
    detokenize,
    from_json_str,
    load_tokenizer,
    split_words,
)

ENGLISH = (
    "Happy families are all alike; every unhappy family is unhappy in its own way.\n"
    "Everything was in confusion in the Oblonskys' house. \"I'm not going,\" she said.\n"
    "\"Yes, yes, how was it now?\" he thought. It's eight o'clock, don't you see?\n"
)
FRENCH = (
    "Je n'ai pas d'argent.\nCours\u202f!\nL\u2019homme est là.\nÉlève à côté, ça va ?\n"
    "Où est la gare ? Il fait très beau aujourd'hui.\n"
)


def book_split(text: str) -> list[str]:
    """The book's ch 8.5 preprocessing, written out as it does it (slow, reference only)."""
    text = text.lower().replace("\n", " ")
    punctuations = [c for c in set(text) if not c.isalpha() and not c.isdigit()]
    for x in punctuations:
        text = text.replace(x, f" {x} ")
    return text.split()


@pytest.fixture(scope="module")
def word() -> WordTokenizer:
    return WordTokenizer.train([ENGLISH])


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([ENGLISH * 3, FRENCH * 3], vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train([ENGLISH, FRENCH])


@pytest.fixture(params=["word", "char", "bpe"])
def any_tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


# --- common interface -------------------------------------------------------------------------


def test_special_ids_are_fixed(any_tokenizer):
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert any_tokenizer.token_to_id(token) == i
        assert any_tokenizer.id_to_token(i) == token
    assert any_tokenizer.kind in ("word", "char", "bpe")


def test_save_load_round_trip(any_tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    any_tokenizer.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # atomic: no temp left
    loaded = load_tokenizer(path)
    assert type(loaded) is type(any_tokenizer)
    assert loaded.vocab_size == any_tokenizer.vocab_size
    assert loaded.lowercase == any_tokenizer.lowercase
    for text in (ENGLISH, FRENCH, "unseen zebra 🙂"):
        assert loaded.encode(text) == any_tokenizer.encode(text)
        assert loaded.tokenize(text) == any_tokenizer.tokenize(text)
    # The JSON string form (for checkpoints) gives the same tokenizer.
    again = type(any_tokenizer).from_json_str(any_tokenizer.to_json_str())
    assert again.encode(ENGLISH) == any_tokenizer.encode(ENGLISH)
    assert from_json_str(any_tokenizer.to_json_str()).kind == any_tokenizer.kind


def test_from_json_str_checks_the_kind(word):
    with pytest.raises(ScrivenError, match="holds a word tokenizer, expected char"):
        CharTokenizer.from_json_str(word.to_json_str(), "ckpt/tokenizer.json")


def test_decode_skips_special_tokens(any_tokenizer):
    ids = any_tokenizer.encode("Happy families")
    wrapped = [BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]
    assert any_tokenizer.decode(wrapped) == any_tokenizer.decode(ids)
    shown = any_tokenizer.decode([BOS_ID, *ids, EOS_ID], skip_special=False)
    assert shown.startswith("<bos>") and shown.endswith("<eos>")


def test_out_of_range_ids_are_an_error(any_tokenizer):
    with pytest.raises(ScrivenError, match="out of range"):
        any_tokenizer.decode([any_tokenizer.vocab_size])
    with pytest.raises(ScrivenError, match="out of range"):
        any_tokenizer.id_to_token(-1)
    assert any_tokenizer.token_to_id("no-such-token-here") is None


# --- word tokenizer ---------------------------------------------------------------------------


def test_split_words_like_the_book():
    assert split_words("I'm here") == ["i", "'", "m", "here"]
    assert split_words("see, she\nsaid.") == ["see", ",", "she", "said", "."]
    assert split_words("Well-known", lowercase=False) == ["Well", "-", "known"]
    sample = (ENGLISH + FRENCH + "snake_case ½ 2nd x²  tabs\tand\u00a0spaces [a](b) {c} \\ ^ "
              "Ⅻ 一 e\u0301 🙂!\r\n")
    assert split_words(sample) == book_split(sample)


def test_vocabulary_order_frequency_then_alphabet():
    tok = WordTokenizer.train(["b a c b a b", "zeta"])
    assert tok.tokens == [*SPECIAL_TOKENS, "b", "a", "c", "zeta"]
    assert tok.encode("B a Zeta") == [4, 5, 7]


def test_min_count_and_max_size_make_unknowns():
    texts = ["the cat the dog the cat emu"]
    assert WordTokenizer.train(texts, min_count=2).tokens[4:] == ["the", "cat"]
    assert WordTokenizer.train(texts, max_size=6).tokens[4:] == ["the", "cat"]
    tok = WordTokenizer.train(texts, min_count=2)
    assert tok.encode("the dog") == [4, UNK_ID]
    ids, unknown = tok.encode_with_unknowns("The dog and the emu, the cat")
    assert ids.count(UNK_ID) == 4 and unknown == ["dog", "and", "emu", ","]
    assert tok.decode(ids) == "The the the cat"  # <unk> is a special token: left out
    assert tok.decode(ids, skip_special=False) == "The <unk> <unk> the <unk> <unk> the cat"


@pytest.mark.parametrize("bad", [{"min_count": 0}, {"max_size": 4}, {"max_size": 2.5}])
def test_bad_training_parameters(bad):
    with pytest.raises(ScrivenError, match=next(iter(bad))):
        WordTokenizer.train(["a b"], **bad)


def test_training_input_checks():
    assert WordTokenizer.train("one string").tokens[4:] == ["one", "string"]
    with pytest.raises(ScrivenError, match="no words"):
        WordTokenizer.train(["", "  \n"])
    with pytest.raises(ScrivenError, match=r"texts\[1\] is a int"):
        WordTokenizer.train(["fine", 3])  # type: ignore[list-item]


def test_keeping_case():
    tok = WordTokenizer.train(["The cat saw the Cat."], lowercase=False)
    assert tok.tokens[4:] == [".", "Cat", "The", "cat", "saw", "the"]
    assert tok.decode(tok.encode("the cat saw The Cat.")) == "the cat saw The Cat."


def test_word_round_trip_of_sentence_cased_text(word):
    text = "\"I'm not going,\" she said. It's eight o'clock, don't you see?"
    assert word.decode(word.encode(text)) == text


def test_word_emoji_is_unknown_unless_trained():
    # "🙂" is neither a letter nor a digit, so it is a token of its own, like punctuation:
    # unseen in training it encodes as <unk> (and decodes to nothing); seen, it round-trips.
    plain = WordTokenizer.train(["i am happy"])
    ids, unknown = plain.encode_with_unknowns("i am happy 🙂")
    assert ids[-1] == UNK_ID and unknown == ["🙂"]
    assert plain.decode(ids) == "I am happy"
    with_emoji = WordTokenizer.train(["i am happy 🙂"])
    assert with_emoji.decode(with_emoji.encode("i am happy 🙂")) == "I am happy 🙂"


def test_word_encode_is_fast_on_a_novel_sized_text():
    novel = ENGLISH * (2_000_000 // len(ENGLISH))  # about 2 MB
    start = time.perf_counter()
    tok = WordTokenizer.train([novel])
    ids = tok.encode(novel)
    elapsed = time.perf_counter() - start
    assert len(ids) > 300_000 and UNK_ID not in ids
    assert elapsed < 5.0, f"train + encode of 2 MB took {elapsed:.1f}s"


# --- detokenizer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ("i ' m not going to see , \" she said .", "I'm not going to see,\" she said."),
        ("anna and the prince", "Anna and the prince"),
        ("\" i ' m here , \" she said . \" come in . \"", "\"I'm here,\" she said. \"Come in.\""),
        ("he said , \" hello . \"", "He said, \"Hello.\""),
        ("\" go away ! \" she cried .", "\"Go away!\" she cried."),
        ("don ' t , won ' t , it ' s , we ' ll , they ' re , i ' ve , he ' d",
         "Don't, won't, it's, we'll, they're, I've, he'd"),
        ("at eight o ' clock in the oblonskys ' house", "At eight o'clock in the oblonskys' house"),
        ("it is james ' s book", "It is james's book"),
        ("well - known man - cook , oblonsky - - stiva", "Well-known man-cook, oblonsky--stiva"),
        ("( he smiled ) and [ she ] left . . . why ?", "(He smiled) and [she] left... Why?"),
        ("it cost 3 . 5 roubles , 1 , 000 in all , at 10 : 30 .",
         "It cost 3.5 roubles, 1,000 in all, at 10:30."),
        ("yes ; no : maybe ! really ? i think so .", "Yes; no: maybe! Really? I think so."),
        ("the word \" gentlemanly \" is odd", "The word \"gentlemanly\" is odd"),
        ("' here , your highness , ' says he .", "'Here, your highness,' says he."),
        ("sang , _ il mio tesoro _ - - not", "Sang, _il mio tesoro_--not"),
        ("c ' est la vie , l ' homme .", "C'est la vie, l'homme."),
        ("what ? i ' ll go , i said , and i did", "What? I'll go, I said, and I did"),
        ("the prince . \" \" why , you ?", "The prince.\" \"Why, you?"),  # one speaker, the next
        ("", ""),
    ],
)
def test_detokenize_sentence_case(tokens, expected):
    assert detokenize(tokens.split(), sentence_case=True) == expected


def test_detokenize_without_sentence_case_keeps_tokens_as_written():
    assert detokenize("i ' m Anna . she is here".split()) == "i'm Anna. she is here"
    assert detokenize(["<unk>", ",", "<unk>"]) == "<unk>, <unk>"


# --- char tokenizer ---------------------------------------------------------------------------


def test_char_tokenizer(char):
    assert char.tokens[4:] == sorted(set(ENGLISH + FRENCH))
    for text in (ENGLISH, FRENCH):
        assert char.decode(char.encode(text)) == text
    ids, unknown = char.encode_with_unknowns("a🙂b")
    assert ids[1] == UNK_ID and unknown == ["🙂"]
    assert char.decode(ids) == "ab"
    with pytest.raises(ScrivenError, match="empty"):
        CharTokenizer.train([""])


# --- BPE tokenizer ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Je n'ai pas d'argent.",
        "Élève à côté, ça va ? Où est la gare ?",
        "Happy families are all alike; every unhappy family is unhappy.",
        "Unseen: Zürich, naïve, 🙂 and 日本語.",  # byte fallback: exact even for unseen chars
        "  leading and  double spaces\nand a newline ",
    ],
)
def test_bpe_round_trip_is_exact(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.encode_with_unknowns(text)[1] == []
    assert UNK_ID not in bpe.encode(text)


def test_bpe_normalises_typography(bpe):
    assert bpe.decode(bpe.encode("Cours\u202f!")) == "Cours !"
    assert bpe.decode(bpe.encode("L\u2019homme\u00a0est\u2009là\u200b.")) == "L'homme est là."
    assert bpe.encode("l\u2019homme") == bpe.encode("l'homme")
    assert bpe.decode(bpe.encode("e\u0301le\u0300ve")) == "élève"  # NFC


def test_bpe_merges_and_sizes(bpe):
    assert 300 <= bpe.vocab_size <= 400
    assert len(bpe.encode("families")) < len("families")  # merges were learned
    assert bpe.token_to_id("<0xF0>") is not None  # byte-fallback tokens are in the vocabulary
    assert not bpe.lowercase


def test_bpe_lowercase_option():
    tok = BPETokenizer.train([ENGLISH], vocab_size=300, lowercase=True)
    assert tok.lowercase
    assert tok.decode(tok.encode("Happy Families")) == "happy families"


def test_bpe_file_is_hugging_face_format(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    bpe.save(path)
    hf = HFTokenizer.from_file(str(path))
    assert hf.encode(FRENCH).ids == bpe.encode(FRENCH)
    assert isinstance(load_tokenizer(path), BPETokenizer)


def test_bpe_bad_parameters():
    with pytest.raises(ScrivenError, match="vocab_size must be at least 300"):
        BPETokenizer.train([ENGLISH], vocab_size=100)
    with pytest.raises(ScrivenError, match="min_frequency"):
        BPETokenizer.train([ENGLISH], vocab_size=300, min_frequency=0)
    with pytest.raises(ScrivenError, match="empty"):
        BPETokenizer.train(["", " "], vocab_size=300)


# --- bad files --------------------------------------------------------------------------------


def corrupt_files(word_json: str, bpe_json: str) -> dict[str, bytes]:
    word_doc = json.loads(word_json)
    no_specials = dict(word_doc, tokens=word_doc["tokens"][4:])
    bpe_doc = json.loads(bpe_json)
    bpe_doc["added_tokens"] = bpe_doc["added_tokens"][1:]
    bpe_doc["model"]["vocab"].pop("<pad>")
    return {
        "not-json": b"{ this is not json",
        "a-list": b"[1, 2, 3]",
        "unknown-format": b'{"hello": "world"}',
        "unknown-kind": json.dumps(dict(word_doc, kind="sentencepiece")).encode(),
        "bad-version": json.dumps(dict(word_doc, version=99)).encode(),
        "no-specials": json.dumps(no_specials).encode(),
        "bad-tokens": json.dumps(dict(word_doc, tokens="abc")).encode(),
        "truncated-bpe": bpe_json[: len(bpe_json) // 2].encode(),
        "bpe-without-pad": json.dumps(bpe_doc).encode(),
        "binary": b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
    }


def test_corrupt_tokenizer_files_are_errors_naming_the_file(word, bpe, tmp_path):
    for name, payload in corrupt_files(word.to_json_str(), bpe.to_json_str()).items():
        path = tmp_path / f"{name}.json"
        path.write_bytes(payload)
        with pytest.raises(ScrivenError, match=f"{name}.json"):
            load_tokenizer(path)
    with pytest.raises(ScrivenError, match="missing.json: no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")


def test_duplicate_tokens_are_rejected():
    with pytest.raises(ScrivenError, match="twice"):
        WordTokenizer([*SPECIAL_TOKENS, "a", "a"])
    with pytest.raises(ScrivenError, match="must start with"):
        CharTokenizer(["a", *SPECIAL_TOKENS])
    assert UNK == "<unk>"


def test_bpe_normalises_as_the_data_reader_does(bpe):
    from scriven.data import normalize_text
    messy = "l\u2019homme\u00a0dit\u202f: \u201cVa\u201d\r\nzero\u200bwidth e\u0301te\u0301\u2028fin"
    assert bpe.tokenize(messy) == bpe.tokenize(normalize_text(messy))
