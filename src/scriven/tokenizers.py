"""Tokenizers: word (book-compatible), character and BPE, with fixed special-token ids.

Every tokenizer maps `<pad>`=0, `<unk>`=1, `<bos>`=2, `<eos>`=3, saves to one JSON file and
can be rebuilt from a JSON string (so it can live inside a checkpoint). Word and character
tokenizers use a small scriven format; BPE uses Hugging Face's own `tokenizer.json`.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from .config import check, check_positive_int
from .data import normalization_steps, write_text_atomic
from .errors import ScrivenError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)

FORMAT_NAME = "scriven-tokenizer"
FORMAT_VERSION = 1

T = TypeVar("T", bound="Tokenizer")


class Tokenizer(ABC):
    """What every tokenizer offers. Special ids are fixed (PAD_ID, UNK_ID, BOS_ID, EOS_ID)."""

    kind: ClassVar[str]  # "word" | "char" | "bpe"
    lowercase: bool = False

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def tokenize(self, text: str) -> list[str]:
        """The token strings `encode` would produce (unknown ones kept as written)."""

    @abstractmethod
    def encode_with_unknowns(self, text: str) -> tuple[list[int], list[str]]:
        """Ids of `text`, and the pieces of text that became `<unk>` (so callers can warn)."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Natural text for `ids`; special tokens are left out unless `skip_special` is False."""

    @abstractmethod
    def id_to_token(self, i: int) -> str: ...

    def spacing_waits(self, ids: Sequence[int]) -> bool:
        """Whether the text of the last of `ids` (the few latest tokens) depends on the token
        after it, so that streamed text should wait for that one."""
        return False

    @abstractmethod
    def token_to_id(self, token: str) -> int | None: ...

    @abstractmethod
    def to_json_str(self) -> str:
        """The whole tokenizer as one JSON document (what `save` writes)."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no `<bos>`/`<eos>` are added."""
        return self.encode_with_unknowns(text)[0]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer to one JSON file, atomically."""
        write_text_atomic(path, self.to_json_str())

    @classmethod
    def from_json_str(cls: type[T], text: str, source: str = "tokenizer JSON") -> T:
        """Rebuild a tokenizer from `to_json_str` output; `source` names it in error messages.
        Called on a subclass, the stored kind must match."""
        tokenizer = from_json_str(text, source)
        if not isinstance(tokenizer, cls):
            raise ScrivenError(f"{source}: holds a {tokenizer.kind} tokenizer, expected {cls.kind}")
        return tokenizer

    def _check_id(self, i: int) -> None:
        if not (isinstance(i, int) and 0 <= i < self.vocab_size):
            raise ScrivenError(f"token id {i!r} is out of range for a vocabulary of {self.vocab_size}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, lowercase={self.lowercase})"


class _VocabTokenizer(Tokenizer):
    """A tokenizer that is a list of token strings, index = id, specials first."""

    def __init__(self, tokens: Sequence[str]) -> None:
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ScrivenError(f"vocabulary must start with {', '.join(SPECIAL_TOKENS)}")
        self._tokens = tokens
        self._index = {t: i for i, t in enumerate(tokens)}
        if len(self._index) != len(tokens):
            dup = next(t for t, n in Counter(tokens).items() if n > 1)
            raise ScrivenError(f"vocabulary has the token {dup!r} twice")

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> list[str]:
        """The vocabulary in id order (a copy)."""
        return list(self._tokens)

    def id_to_token(self, i: int) -> str:
        self._check_id(i)
        return self._tokens[i]

    def token_to_id(self, token: str) -> int | None:
        return self._index.get(token)

    def encode(self, text: str) -> list[int]:
        get = self._index.get
        return [get(p, UNK_ID) for p in self.tokenize(text)]

    def encode_with_unknowns(self, text: str) -> tuple[list[int], list[str]]:
        get = self._index.get
        pieces = self.tokenize(text)
        ids = [get(p, UNK_ID) for p in pieces]
        return ids, [p for p, i in zip(pieces, ids, strict=True) if i == UNK_ID and p != UNK]

    def _decode_tokens(self, ids: Iterable[int], skip_special: bool) -> list[str]:
        ids = list(ids)
        if ids and not (min(ids) >= 0 and max(ids) < len(self._tokens)):
            self._check_id(next(i for i in ids if not 0 <= i < len(self._tokens)))
        first = len(SPECIAL_TOKENS) if skip_special else 0
        tokens = self._tokens
        return [tokens[i] for i in ids if i >= first]

    def _json_fields(self) -> dict[str, Any]:
        return {}

    def to_json_str(self) -> str:
        doc = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": self.kind}
        doc.update(self._json_fields())
        doc["tokens"] = self._tokens
        return json.dumps(doc, ensure_ascii=False, indent=1) + "\n"


def _as_texts(texts: Iterable[str] | str) -> Iterator[str]:
    """Iterate training texts, checking types; a single string counts as one text (iterating it
    would silently train on characters)."""
    if isinstance(texts, str):
        yield texts
        return
    for n, text in enumerate(texts):
        if not isinstance(text, str):
            raise ScrivenError(f"texts[{n}] is a {type(text).__name__}, expected a string")
        yield text


# ---------------------------------------------------------------------------------------------
# Word tokenizer


def split_words(text: str, lowercase: bool = True) -> list[str]:
    """Split like "Learn Generative AI with PyTorch" ch 8.5: lowercase, then every character
    that is neither a letter nor a digit (str.isalpha/isdigit) is a token of its own, and words
    are runs of the rest between whitespace. "I'm" -> ["i", "'", "m"]."""
    if lowercase:
        text = text.lower()
    # Build the separator class from the characters this text actually has: exact
    # isalpha/isdigit semantics (which \w does not give) while the scan stays in C.
    separators = "".join(
        sorted(c for c in set(text) if not (c.isalpha() or c.isdigit() or c.isspace()))
    )
    if not separators:
        return text.split()
    sep = re.escape(separators)
    return re.findall(f"[{sep}]|[^\\s{sep}]+", text)


class WordTokenizer(_VocabTokenizer):
    """Words and single punctuation marks, most frequent first, as in the book's LSTM chapter."""

    kind = "word"

    def __init__(self, tokens: Sequence[str], lowercase: bool = True) -> None:
        super().__init__(tokens)
        self.lowercase = lowercase

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | str,
        lowercase: bool = True,
        min_count: int = 1,
        max_size: int | None = None,
    ) -> WordTokenizer:
        """Vocabulary of `texts`: the 4 specials, then words by falling count, ties
        alphabetically. Words seen fewer than `min_count` times, or beyond `max_size` entries
        in all (specials included), are left out and encode as `<unk>`."""
        check_positive_int(min_count, "min_count")
        if max_size is not None:
            check_positive_int(max_size, "max_size")
            check(max_size > len(SPECIAL_TOKENS), "max_size",
                  f"must leave room for words after the {len(SPECIAL_TOKENS)} special tokens, "
                  f"got {max_size}")
        counts: Counter[str] = Counter()
        for text in _as_texts(texts):
            counts.update(split_words(text, lowercase))
        for special in SPECIAL_TOKENS:  # cannot occur (< and > split off), but never duplicate
            counts.pop(special, None)
        if not counts:
            raise ScrivenError("training text has no words")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        words = [w for w, n in ranked if n >= min_count]
        if max_size is not None:
            words = words[: max_size - len(SPECIAL_TOKENS)]
        return cls([*SPECIAL_TOKENS, *words], lowercase=lowercase)

    def tokenize(self, text: str) -> list[str]:
        return split_words(text, self.lowercase)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        # A lowercased vocabulary lost the case: put back what is certain (sentence starts, "I").
        return detokenize(self._decode_tokens(ids, skip_special), sentence_case=self.lowercase)

    def spacing_waits(self, ids: Sequence[int]) -> bool:
        # A quote mark opens or closes by what follows; "3 ." joins "5" only if "5" follows.
        tokens = [self.id_to_token(i) for i in ids[-2:]]
        return tokens[-1] in _SYMMETRIC_QUOTES or (
            tokens[-1] in _DIGIT_SEPARATORS and len(tokens) == 2 and tokens[0].isdigit())

    def _json_fields(self) -> dict[str, Any]:
        return {"lowercase": self.lowercase}


# ---------------------------------------------------------------------------------------------
# Detokenizer: word tokens back to natural text

_CLOSERS = frozenset([",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "\u2026", "\u00bb",
                      "\u201d"])
_OPENERS = frozenset(["(", "[", "{", "$", "\u00a3", "\u20ac", "#", "\u00ab", "\u201c", "\u2018",
                      "\u00bf", "\u00a1"])
_JOINERS = frozenset(["-", "\u2013", "\u2014", "/"])  # well-known, Oblonsky--Stiva, and/or
_SYMMETRIC_QUOTES = frozenset(['"', "'", "_", "\u2019"])  # same mark opens and closes
_APOSTROPHES = frozenset(["'", "\u2019"])
_DIGIT_SEPARATORS = frozenset([".", ",", ":"])  # 3.5, 1,000, 10:30
_SUFFIXES = frozenset(["s", "t", "m", "d", "ll", "re", "ve"])  # it's don't i'm he'd we'll ...
_ELISIONS = frozenset(["o", "c", "d", "j", "l", "m", "n", "s", "t", "qu", "jusqu", "lorsqu",
                       "puisqu"])  # o'clock; French c'est, l'homme, qu'il
_SPEECH_VERBS = frozenset(["said", "says", "asked", "cried", "answered", "replied", "thought",
                           "added", "shouted", "whispered", "exclaimed", "continued",
                           "repeated", "muttered", "observed", "remarked", "began",
                           "interrupted", "went", "called", "screamed", "murmured"])
_PRONOUNS = frozenset(["he", "she", "i", "they", "we", "you"])

_WORD, _OPEN, _CLOSE, _JOIN = 0, 1, 2, 3  # roles: how a token attaches to its neighbours
_UNBALANCED = 2.0  # cost of two opening (or closing) quotes in a row


def _is_word(token: str | None) -> bool:
    return token is not None and token[:1].isalnum()


def detokenize(tokens: Sequence[str], sentence_case: bool = False) -> str:
    """Join word-tokenizer tokens into natural text: no space before , . ; : ! ? ) ] or a
    closing quote, none after ( [ or an opening quote, contractions rejoined ("i ' m" ->
    "i'm"), hyphens joined. `sentence_case` capitalises the text start, each sentence after
    . ! ? and the word "i" (what can be restored for a lowercased vocabulary)."""
    n = len(tokens)
    roles = [_WORD] * n
    quotes: dict[str, list[int]] = {}
    for k, tok in enumerate(tokens):
        prev = tokens[k - 1] if k > 0 else None
        nxt = tokens[k + 1] if k + 1 < n else None
        if tok in _APOSTROPHES and _is_word(prev) and _is_word(nxt):
            low_prev, low_next = prev.lower(), nxt.lower()
            if low_next in _SUFFIXES or low_prev in _ELISIONS:
                roles[k] = _JOIN  # i'm, don't, it's, o'clock, l'homme
                continue
            if low_prev.endswith("s"):
                roles[k] = _CLOSE  # the Oblonskys' house
                continue
        if (tok in _DIGIT_SEPARATORS and prev is not None and prev.isdigit()
                and nxt is not None and nxt.isdigit()):
            roles[k] = _JOIN
        elif tok in _SYMMETRIC_QUOTES:
            quotes.setdefault(tok, []).append(k)
        elif tok in _CLOSERS:
            roles[k] = _CLOSE
        elif tok in _OPENERS:
            roles[k] = _OPEN
        elif tok in _JOINERS:
            roles[k] = _JOIN
    for positions in quotes.values():
        for k, role in zip(positions, _quote_roles(tokens, positions), strict=True):
            roles[k] = role
    parts: list[str] = []
    for k, tok in enumerate(tokens):
        if k > 0 and roles[k - 1] not in (_OPEN, _JOIN) and roles[k] not in (_CLOSE, _JOIN):
            parts.append(" ")
        parts.append(tok)
    text = "".join(parts)
    return _sentence_case(text) if sentence_case else text


def _quote_roles(tokens: Sequence[str], positions: list[int]) -> list[int]:
    """Opening or closing for each occurrence of one symmetric quote mark. Quotes alternate,
    but text may start inside a quotation (a generated continuation often does), so the
    labels are chosen by a tiny Viterbi over local evidence plus a cost for breaking the
    alternation: `see , " she said` has a closing quote, `he said , " hello` an opening one."""
    costs = [(_open_cost(tokens, k), _close_cost(tokens, k)) for k in positions]
    # best[s]: cost of the best labelling so far that ends with label s (0 open, 1 close).
    best = [costs[0][0], costs[0][1] + 0.01]  # ties: a first quote opens
    back: list[tuple[int, int]] = []
    for open_cost, close_cost in costs[1:]:
        from_open = (best[0] + _UNBALANCED, best[1])  # previous label (open, close) -> open
        from_close = (best[0], best[1] + _UNBALANCED)  # -> close
        choice = (int(from_open[1] < from_open[0]), int(from_close[1] < from_close[0]))
        best = [from_open[choice[0]] + open_cost, from_close[choice[1]] + close_cost]
        back.append(choice)
    label = int(best[1] < best[0])
    labels = [label]
    for choice in reversed(back):
        label = choice[label]
        labels.append(label)
    labels.reverse()
    return [_CLOSE if lab else _OPEN for lab in labels]


def _open_cost(tokens: Sequence[str], k: int) -> float:
    nxt = tokens[k + 1].lower() if k + 1 < len(tokens) else None
    prev = tokens[k - 1] if k > 0 else None
    if nxt is None or nxt in _CLOSERS:
        return 3.0  # nothing is quoted
    if nxt in _SYMMETRIC_QUOTES:
        return 2.0  # '. " "': one speaker stops, the next starts
    if nxt in _SPEECH_VERBS:
        return 2.0  # ' " said he' follows a quotation
    if nxt in _PRONOUNS and prev in (",", "!", "?"):
        return 1.0  # ' , " she said'
    return 0.0


def _close_cost(tokens: Sequence[str], k: int) -> float:
    prev = tokens[k - 1] if k > 0 else None
    before = tokens[k - 2].lower() if k > 1 else None
    if prev is None or prev in _OPENERS:
        return 3.0  # nothing was quoted
    if prev in _SYMMETRIC_QUOTES:
        return 2.0
    if prev in (",", ":") and before in _SPEECH_VERBS:
        return 2.0  # 'he said , "' introduces a quotation
    if prev == ":":
        return 1.0
    return 0.0


_SENTENCE_RE = re.compile(r"([.!?])([^\w\s]*)(\s+[^\w\s]*)([^\W\d_]\w*)")
# 'he said, "hello' -> 'he said, "Hello': a quotation introduced by , or : starts a sentence.
_QUOTATION_RE = re.compile(r"([,:]\s+[\"\u201c]['\u2018]?)([^\W\d_])")
_I_RE = re.compile(r"(?<!\w)(?<!\w')i(?!\w)")
_QUOTE_CHARS = frozenset("\"'\u201d\u2019")


def _capitalise_sentence(m: re.Match[str]) -> str:
    end, after, gap, word = m.groups()
    # '"Go away!" she cried.': a quoted exclamation or question inside a sentence.
    if end in "!?" and _QUOTE_CHARS.intersection(after) and word in _PRONOUNS | _SPEECH_VERBS:
        return m.group(0)
    return end + after + gap + word[0].upper() + word[1:]


def _sentence_case(text: str) -> str:
    # Special tokens shown by decode(skip_special=False) must stay as they are: hide them as
    # private-use characters, which the patterns treat like punctuation.
    hidden = [(token, chr(0xE000 + k)) for k, token in enumerate(SPECIAL_TOKENS) if token in text]
    for token, mark in hidden:
        text = text.replace(token, mark)
    # A shown <unk> stands for a word: when the text starts with one, that word is the start.
    unk = dict(hidden).get(UNK, "")
    text = re.sub(rf"^([^\w{unk}]*)([^\W\d_])", lambda m: m.group(1) + m.group(2).upper(),
                  text, count=1)
    text = _SENTENCE_RE.sub(_capitalise_sentence, text)
    text = _QUOTATION_RE.sub(lambda m: m.group(1) + m.group(2).upper(), text)
    text = _I_RE.sub("I", text)
    for token, mark in hidden:
        text = text.replace(mark, token)
    return text


# ---------------------------------------------------------------------------------------------
# Character tokenizer


class CharTokenizer(_VocabTokenizer):
    """One token per character, in code-point order after the specials; decode concatenates."""

    kind = "char"

    @classmethod
    def train(cls, texts: Iterable[str] | str) -> CharTokenizer:
        """Vocabulary of every character in `texts`."""
        chars: set[str] = set()
        for text in _as_texts(texts):
            chars.update(text)
        if not chars:
            raise ScrivenError("training text is empty")
        return cls([*SPECIAL_TOKENS, *sorted(chars)])

    def tokenize(self, text: str) -> list[str]:
        return list(text)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return "".join(self._decode_tokens(ids, skip_special))


# ---------------------------------------------------------------------------------------------
# BPE tokenizer (Hugging Face `tokenizers`)

_BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
BPE_MIN_VOCAB = 300

class BPETokenizer(Tokenizer):
    """Byte-pair encoding via HF `tokenizers`: NFC and space/quote normalisation, Metaspace
    pre-tokenization (case and accents kept, "▁" marks a space) and byte fallback, so any
    character a model never saw still encodes (as its UTF-8 bytes) and decodes back exactly."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any, source: str = "BPE tokenizer") -> None:
        for i, token in enumerate(SPECIAL_TOKENS):
            if hf_tokenizer.token_to_id(token) != i:
                raise ScrivenError(f"{source}: {token} must have id {i}")
        self._hf = hf_tokenizer
        self.lowercase = _has_lowercase(json.loads(hf_tokenizer.to_str()).get("normalizer"))

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._hf

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | str,
        vocab_size: int = 8000,
        min_frequency: int = 2,
        lowercase: bool = False,
    ) -> BPETokenizer:
        """Learn merges from `texts`. `vocab_size` counts everything: 4 specials, the 256
        byte-fallback tokens, characters and merges. Pairs seen fewer than `min_frequency`
        times are not merged."""
        from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        check_positive_int(vocab_size, "vocab_size")
        check(vocab_size >= BPE_MIN_VOCAB, "vocab_size",
              f"must be at least {BPE_MIN_VOCAB} (4 special and 256 byte tokens come first), "
              f"got {vocab_size}")
        check_positive_int(min_frequency, "min_frequency")
        # scriven.data.normalize_text, inside the tokenizer so that it travels with the
        # checkpoint and applies to prompts: "Cours\u202f!" -> "Cours !", "l’homme" -> "l'homme".
        steps = [normalizers.Replace(Regex(pattern), replacement)
                 for pattern, replacement in normalization_steps()]
        steps.append(normalizers.NFC())
        if lowercase:
            steps.append(normalizers.Lowercase())
        # Prepend the space marker in the normalizer (not the pre-tokenizer) so that leading
        # spaces survive a round trip: the decoder drops exactly the one marker added here.
        steps.append(normalizers.Prepend("\u2581"))
        hf = HFTokenizer(models.BPE(unk_token=UNK, byte_fallback=True))
        hf.normalizer = normalizers.Sequence(steps)
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
        hf.decoder = decoders.Sequence([
            decoders.ByteFallback(),
            decoders.Metaspace(replacement="\u2581", prepend_scheme="always"),
        ])
        learned = vocab_size - len(_BYTE_TOKENS)
        trainer = trainers.BpeTrainer(
            vocab_size=learned,
            min_frequency=min_frequency,
            special_tokens=list(SPECIAL_TOKENS),  # first, so their ids are 0..3
            limit_alphabet=learned - len(SPECIAL_TOKENS),  # rarer characters use byte fallback
            show_progress=False,
        )
        seen = [False]

        def checked() -> Iterator[str]:
            for text in _as_texts(texts):
                seen[0] = seen[0] or bool(text.strip())
                yield text

        hf.train_from_iterator(checked(), trainer)
        if not seen[0]:
            raise ScrivenError("training text is empty")
        # The trainer cannot add byte-fallback tokens, so append <0x00>..<0xFF> to the model.
        doc = json.loads(hf.to_str())
        vocab: dict[str, int] = doc["model"]["vocab"]
        next_id = max(vocab.values()) + 1
        for token in _BYTE_TOKENS:
            if token not in vocab:
                vocab[token] = next_id
                next_id += 1
        return cls(HFTokenizer.from_str(json.dumps(doc, ensure_ascii=False)))

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        return self._hf.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids

    def encode_with_unknowns(self, text: str) -> tuple[list[int], list[str]]:
        enc = self._hf.encode(text, add_special_tokens=False)
        # Byte fallback leaves no unknown characters; only a literal "<unk>" in the text.
        unknown = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets, strict=True) if i == UNK_ID]
        return enc.ids, [u for u in unknown if u != UNK]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = list(ids)
        for i in ids:
            self._check_id(i)
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str:
        self._check_id(i)
        return self._hf.id_to_token(i)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def to_json_str(self) -> str:
        return self._hf.to_str(pretty=True)


def _has_lowercase(normalizer: Any) -> bool:
    if isinstance(normalizer, dict):
        return normalizer.get("type") == "Lowercase" or _has_lowercase(normalizer.get("normalizers"))
    if isinstance(normalizer, list):
        return any(_has_lowercase(n) for n in normalizer)
    return False


# ---------------------------------------------------------------------------------------------
# Loading


def from_json_str(text: str, source: str = "tokenizer JSON") -> Tokenizer:
    """Rebuild any tokenizer from its JSON (scriven format or HF tokenizer.json), detecting the
    kind. `source` names the file or checkpoint in error messages."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScrivenError(f"{source}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(doc, dict):
        raise ScrivenError(f"{source}: not a tokenizer (expected a JSON object)")
    if doc.get("format") == FORMAT_NAME:
        return _from_scriven_doc(doc, source)
    model = doc.get("model")
    if isinstance(model, dict) and "added_tokens" in doc:
        if model.get("type") != "BPE":
            raise ScrivenError(f"{source}: a {model.get('type')} tokenizer; only BPE is supported")
        from tokenizers import Tokenizer as HFTokenizer

        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exceptions with its own message
            raise ScrivenError(f"{source}: not a valid tokenizer.json ({e})") from None
        return BPETokenizer(hf, source)
    raise ScrivenError(f"{source}: not a scriven or Hugging Face tokenizer file")


def _from_scriven_doc(doc: dict[str, Any], source: str) -> Tokenizer:
    if doc.get("version") != FORMAT_VERSION:
        raise ScrivenError(f"{source}: unsupported tokenizer format version {doc.get('version')!r}")
    tokens = doc.get("tokens")
    if not (isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)):
        raise ScrivenError(f"{source}: 'tokens' must be a list of strings")
    kind = doc.get("kind")
    try:
        if kind == "word":
            lowercase = doc.get("lowercase")
            if not isinstance(lowercase, bool):
                raise ScrivenError("'lowercase' must be true or false")
            return WordTokenizer(tokens, lowercase=lowercase)
        if kind == "char":
            if any(len(t) != 1 for t in tokens[len(SPECIAL_TOKENS):]):
                raise ScrivenError("a char tokenizer's tokens must be single characters")
            return CharTokenizer(tokens)
    except ScrivenError as e:
        raise ScrivenError(f"{source}: {e}") from None
    raise ScrivenError(f"{source}: unknown tokenizer kind {kind!r}; expected word, char or bpe")


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved by `save` (or any HF BPE tokenizer.json with the fixed specials)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScrivenError(f"{path}: no such tokenizer file") from None
    except UnicodeDecodeError as e:
        raise ScrivenError(f"{path}: not a tokenizer (not UTF-8 at byte offset {e.start})") from None
    except OSError as e:
        raise ScrivenError(f"{path}: cannot read ({e.strerror})") from e
    return from_json_str(text, str(path))
