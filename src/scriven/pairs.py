"""Sentence-pair files (TSV such as Tatoeba's fra.txt, or quoted CSV), text normalisation, a
deterministic train/valid/test split by source sentence, and token-count batching."""

from __future__ import annotations

import csv
import hashlib
import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .config import check, check_float, check_positive_int
from .data import normalize_text
from .errors import ScrivenError
from .tokenizers import BPETokenizer, Tokenizer

FORMATS = ("tsv", "csv")

@dataclass(frozen=True)
class Pair:
    """One sentence pair; `meta` keeps any extra columns (e.g. Tatoeba attribution)."""

    source: str
    target: str
    meta: tuple[str, ...] = ()
    line: int = 0  # 1-based line in the file where the record starts


@dataclass
class PairReport:
    """What reading a pair file kept and skipped, with line numbers."""

    path: str
    records: int = 0  # non-blank records seen
    kept: int = 0
    malformed: list[tuple[int, str]] = field(default_factory=list)  # (line, reason)
    too_long: list[int] = field(default_factory=list)  # lines dropped by max_words

    def summary(self, show: int = 5) -> str:
        """One line for logs: counts plus the first few skipped line numbers."""
        parts = [f"{self.path}: kept {self.kept} of {self.records} pairs"]
        if self.malformed:
            where = ", ".join(f"line {n} ({why})" for n, why in self.malformed[:show])
            more = " ..." if len(self.malformed) > show else ""
            parts.append(f"{len(self.malformed)} malformed: {where}{more}")
        if self.too_long:
            where = ", ".join(map(str, self.too_long[:show]))
            more = " ..." if len(self.too_long) > show else ""
            parts.append(f"{len(self.too_long)} over the length limit (lines {where}{more})")
        return "; ".join(parts)


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ScrivenError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8-sig")  # a leading BOM is dropped
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ScrivenError(f"{path}: not valid UTF-8 at byte offset {e.start} (line {line}); "
                           "convert the file to UTF-8") from None
    if not text.strip():
        raise ScrivenError(f"{path}: file is empty")
    return text


def _records(text: str, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(starting line number, fields) per non-blank record."""
    if fmt == "tsv":
        # Split on "\n" only: str.splitlines would also break on U+2028, U+0085 inside text.
        for number, line in enumerate(text.split("\n"), start=1):
            line = line.rstrip("\r")
            if line.strip():
                yield number, line.split("\t")
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
        start = 1
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    yield start, row
                start = reader.line_num + 1  # a quoted field may span several lines
        except csv.Error as e:
            raise ScrivenError(f"line {reader.line_num}: bad CSV ({e})") from None


def read_pairs(
    path: str | Path,
    fmt: str | None = None,
    strict: bool = False,
    max_words: int | None = None,
    header: bool = False,
) -> tuple[list[Pair], PairReport]:
    """Read sentence pairs: column 1 = source, column 2 = target, further columns = metadata.

    `fmt` is "tsv" or "csv" (None: "csv" for *.csv files, else "tsv"). Text is normalised with
    `data.normalize_text` (as sentences). Records with fewer than two fields or an empty side are malformed:
    skipped and reported, or with `strict` the first one raises ScrivenError naming file and
    line. Pairs where either side has more than `max_words` words are dropped and reported.
    `header` skips the first record. Raises ScrivenError when the file is missing, empty, not
    UTF-8, or yields no pairs.
    """
    path = Path(path)
    if fmt is None:
        fmt = "csv" if path.suffix.lower() == ".csv" else "tsv"
    check(fmt in FORMATS, "fmt", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if max_words is not None:
        check_positive_int(max_words, "max_words")
    text = _decode(path)
    report = PairReport(path=str(path))
    pairs: list[Pair] = []
    try:
        records = list(_records(text, fmt))
    except ScrivenError as e:
        raise ScrivenError(f"{path}: {e}") from None
    for number, fields in records[1:] if header else records:
        report.records += 1
        if len(fields) < 2:
            problem = "fewer than 2 fields"
        else:
            source, target = normalize_text(fields[0], sentence=True), normalize_text(fields[1], sentence=True)
            problem = "empty source" if not source else "empty target" if not target else ""
        if problem:
            if strict:
                raise ScrivenError(f"{path}:{number}: {problem}")
            report.malformed.append((number, problem))
            continue
        if max_words is not None and max(len(source.split()), len(target.split())) > max_words:
            report.too_long.append(number)
            continue
        pairs.append(Pair(source, target, tuple(f.strip() for f in fields[2:]), number))
    report.kept = len(pairs)
    if not pairs:
        raise ScrivenError(f"{path}: no usable sentence pairs ({report.summary()})")
    return pairs, report


@dataclass(frozen=True)
class Splits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]


def split_key(source: str) -> str:
    """What counts as "the same source sentence" for splitting: normalised and case-folded."""
    return normalize_text(source, sentence=True).casefold()


def split_pairs(
    pairs: Sequence[Pair],
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
    seed: int = 0,
) -> Splits:
    """Split by a seeded hash of the source sentence, so every translation of one English
    sentence lands in the same split (no test sentence seen in training), and a pair's split
    depends only on its sentence and the seed, not on file order or size."""
    check_float(valid_fraction, "valid_fraction", 0.0, 1.0, high_open=True)
    check_float(test_fraction, "test_fraction", 0.0, 1.0, high_open=True)
    check(valid_fraction + test_fraction < 1.0, "valid_fraction",
          f"plus test_fraction must be below 1, got {valid_fraction + test_fraction}")
    check_positive_int(seed, "seed", allow_zero=True)
    train: list[Pair] = []
    valid: list[Pair] = []
    test: list[Pair] = []
    for pair in pairs:
        # blake2b, not hash(): Python salts str hashes per process.
        digest = hashlib.blake2b(f"{seed}\0{split_key(pair.source)}".encode(), digest_size=8)
        u = int.from_bytes(digest.digest(), "big") / 2**64  # uniform in [0, 1)
        (test if u < test_fraction else valid if u < test_fraction + valid_fraction
         else train).append(pair)
    return Splits(train, valid, test)


@dataclass(frozen=True)
class Batch:
    """Padded ids: src (B, S), tgt (B, T); `indices` are the examples' positions in the input."""

    src: Tensor
    tgt: Tensor
    indices: list[int]


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> Tensor:
    """Right-pad to the longest sequence → LongTensor (N, max length)."""
    lengths = torch.tensor([len(seq) for seq in seqs])                  # (N,)
    out = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    # One scatter of all ids, not one small copy per sequence (a tenth of the time).
    out[torch.arange(out.size(1)) < lengths[:, None]] = torch.tensor(
        [i for seq in seqs for i in seq], dtype=torch.long)
    return out


def token_batches(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_tokens: int,
    pad_id: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
) -> list[Batch]:
    """Batches of encoded (src_ids, tgt_ids) pairs whose padded size, batch size × the longest
    source or target in the batch, is at most `max_tokens` (so each of the two padded tensors
    holds ≤ max_tokens ids).

    Length bucketing: examples are shuffled (with `seed`), sorted by their longer side (all of
    them, or each chunk of `chunk_size`) and cut into batches, so sentences of the same length
    share a batch (little padding). Batches still differ from epoch to epoch (pass seed + epoch):
    the sort is stable, so pairs of equal lengths stay in shuffled order, and the batch order is
    shuffled too. With `shuffle=False` the input order breaks ties and the batch order is kept:
    deterministic, for evaluation.
    """
    check_positive_int(max_tokens, "max_tokens")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    if not examples:
        return []
    lengths = [(len(s), len(t)) for s, t in examples]
    if min(min(pair) for pair in lengths) == 0:
        i = next(i for i, pair in enumerate(lengths) if min(pair) == 0)
        raise ScrivenError(f"example {i} has an empty side; every example needs ids on both sides")
    longest = max(max(pair) for pair in lengths)
    check(longest <= max_tokens, "max_tokens",
          f"must be at least the longest example ({longest} tokens), got {max_tokens}; "
          "raise it or filter long pairs")
    rng = random.Random(seed)
    order = list(range(len(examples)))
    if shuffle:
        rng.shuffle(order)

    groups: list[list[int]] = []
    step = chunk_size or len(order)
    for start in range(0, len(order), step):
        # By the longer side first: a batch's width is its longest sentence on either side, so
        # this leaves the least padding in the two tensors together. Sorting the whole set, not
        # chunks of 4,096, puts 96 % real tokens in eng-fra's source tensors, against 72 %
        # (target: 99 % against 93 %): 1.16x the target tokens/s of a training step.
        chunk = sorted(order[start : start + step],
                       key=lambda i: (max(lengths[i]), lengths[i]))
        group: list[int] = []
        width = 0
        for i in chunk:
            new_width = max(width, *lengths[i])
            if group and (len(group) + 1) * new_width > max_tokens:
                groups.append(group)
                group, new_width = [], max(lengths[i])
            group.append(i)
            width = new_width
        groups.append(group)
    if shuffle:
        rng.shuffle(groups)
    return [
        Batch(src=pad_sequences([examples[i][0] for i in g], pad_id),
              tgt=pad_sequences([examples[i][1] for i in g], pad_id),
              indices=g)
        for g in groups
    ]


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (the BPE tokenizer encodes them all in one call, on all cores)."""
    if isinstance(tok, BPETokenizer):
        return [e.ids for e in tok.hf_tokenizer.encode_batch(list(texts), add_special_tokens=False)]
    return [tok.encode(t) for t in texts]


def encode_sources(tok: Tokenizer, max_len: int, texts: Sequence[str],
                   names: Sequence[str] | None = None) -> tuple[list[list[int]], list[int]]:
    """Normalised source ids, and the indices of sources cut to `max_len` tokens. An empty
    source (after normalisation) is an error naming it (`names[i]`, or text[i])."""
    normalised = []
    for i, text in enumerate(texts):
        where = names[i] if names is not None else f"text[{i}]"
        if not isinstance(text, str):
            raise ScrivenError(f"{where} must be a string, got {type(text).__name__}")
        clean = normalize_text(text, sentence=True)
        if not clean:
            raise ScrivenError(f"{where} is empty: nothing to translate")
        normalised.append(clean)
    ids = encode_texts(tok, normalised)
    cut = [i for i, x in enumerate(ids) if len(x) > max_len]
    return [x[:max_len] for x in ids], cut
