"""Pair files: messy real-world encodings read cleanly, problems are reported by line, splits are
stable and leak-free, batches respect the token budget."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from scriven.data import normalize_text
from scriven.errors import ScrivenError
from scriven.pairs import (
    Pair,
    pad_sequences,
    read_pairs,
    split_pairs,
    token_batches,
)

ATTRIBUTION = "CC-BY 2.0 (France) Attribution: example.org #101 (alice) & #202 (bob)"


def write(tmp_path: Path, name: str, data: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


@pytest.mark.parametrize("text, sentence", [
    ("Va\u202f!", "Va !"),
    ("Qu\u2019est-ce\u00a0que c\u2019est\u2009?", "Qu'est-ce que c'est ?"),
    ("  zero\u200bwidth  \t spaces ", "zerowidth spaces"),
    ("e\u0301te\u0301", "été"),  # decomposed accents compose
])
def test_normalize_text_as_a_sentence(text: str, sentence: str) -> None:
    assert normalize_text(text, sentence=True) == sentence


def test_reads_tatoeba_tsv_with_attribution(tmp_path: Path) -> None:
    path = write(tmp_path, "fra.txt",
                 f"Go.\tVa !\t{ATTRIBUTION}\nHi.\tSalut !\t{ATTRIBUTION}\n")
    pairs, report = read_pairs(path)
    assert [(p.source, p.target) for p in pairs] == [("Go.", "Va !"), ("Hi.", "Salut !")]
    assert pairs[0].meta == (ATTRIBUTION,)
    assert [p.line for p in pairs] == [1, 2]
    assert report.kept == report.records == 2 and not report.malformed


def test_bom_crlf_and_unicode_spaces(tmp_path: Path) -> None:
    data = "\ufeffI\u2019m here.\tJe suis l\u00e0\u202f!\r\nRun!\tCours\u00a0!\r\n"
    pairs, _ = read_pairs(write(tmp_path, "p.tsv", data))
    assert [(p.source, p.target) for p in pairs] == [("I'm here.", "Je suis là !"),
                                                    ("Run!", "Cours !")]


def test_malformed_lines_are_reported_with_line_numbers(tmp_path: Path) -> None:
    data = "Go.\tVa !\nno tab here\n\nHi.\t \n\tSalut\nOK.\tD'accord.\n"
    pairs, report = read_pairs(write(tmp_path, "p.tsv", data))
    assert [p.source for p in pairs] == ["Go.", "OK."]
    assert report.malformed == [(2, "fewer than 2 fields"), (4, "empty target"),
                                (5, "empty source")]
    assert report.records == 5 and report.kept == 2  # the blank line 3 is not a record
    assert "line 2" in report.summary()


def test_strict_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "p.tsv", "Go.\tVa !\nHi.\n")
    with pytest.raises(ScrivenError, match=r"p\.tsv:2: fewer than 2 fields"):
        read_pairs(path, strict=True)


def test_length_filter_is_counted(tmp_path: Path) -> None:
    data = "Go.\tVa !\nThis one is long.\tCourt.\nShort.\tCelle-ci est bien trop longue.\n"
    pairs, report = read_pairs(write(tmp_path, "p.tsv", data), max_words=3, strict=True)
    assert [p.source for p in pairs] == ["Go."]
    assert report.too_long == [2, 3]


def test_csv_with_quoting_and_header(tmp_path: Path) -> None:
    data = ('english,french,source\r\n'
            '"Hello, world.","Bonjour, le monde.",web\r\n'
            '"He said ""no"".","Il a dit « non ».",web\r\n'
            '"Two\nlines","Deux lignes",web\r\n'
            'lonely\r\n'
            'Bye.,Salut.,web\r\n')
    pairs, report = read_pairs(write(tmp_path, "p.csv", data), header=True)
    assert [(p.source, p.target) for p in pairs] == [
        ("Hello, world.", "Bonjour, le monde."),
        ('He said "no".', "Il a dit « non »."),
        ("Two lines", "Deux lignes"),
        ("Bye.", "Salut."),
    ]
    assert pairs[0].meta == ("web",)
    assert [p.line for p in pairs] == [2, 3, 4, 7]  # the quoted record spans lines 4-5
    assert report.malformed == [(6, "fewer than 2 fields")]


def test_empty_missing_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ScrivenError, match=r"empty\.tsv: file is empty"):
        read_pairs(write(tmp_path, "empty.tsv", "\ufeff\n\n"))
    with pytest.raises(ScrivenError, match="missing.tsv"):
        read_pairs(tmp_path / "missing.tsv")
    latin1 = "Go.\tVa !\nSummer.\t\u00c9t\u00e9.\n".encode("latin-1")
    bad_utf8 = r"latin\.tsv: not valid UTF-8 at byte offset 17 \(line 2\)"
    with pytest.raises(ScrivenError, match=bad_utf8):
        read_pairs(write(tmp_path, "latin.tsv", latin1))
    with pytest.raises(ScrivenError, match="no usable sentence pairs"):
        read_pairs(write(tmp_path, "bad.tsv", "just text\nmore text\n"))
    with pytest.raises(ScrivenError, match="fmt"):
        read_pairs(write(tmp_path, "x.tsv", "a\tb\n"), fmt="xlsx")


def _pairs(n: int) -> list[Pair]:
    # Each English sentence has two translations, as in Tatoeba.
    return [Pair(f"Sentence number {i // 2}.", f"Phrase {i}.") for i in range(n)]


def test_split_is_by_source_sentence_and_deterministic() -> None:
    pairs = _pairs(2000)
    splits = split_pairs(pairs, valid_fraction=0.1, test_fraction=0.1, seed=7)
    sources = [{p.source for p in part} for part in (splits.train, splits.valid, splits.test)]
    assert not (sources[0] & sources[1] or sources[0] & sources[2] or sources[1] & sources[2])
    assert len(splits.train) + len(splits.valid) + len(splits.test) == 2000
    assert 100 < len(splits.test) < 300 and 100 < len(splits.valid) < 300

    # Same split regardless of order, and case/spacing variants of a sentence stay together.
    shuffled = pairs[:]
    random.Random(0).shuffle(shuffled)
    again = split_pairs(shuffled, valid_fraction=0.1, test_fraction=0.1, seed=7)
    assert {p.target for p in again.test} == {p.target for p in splits.test}
    variant = Pair(pairs[0].source.upper().replace(" ", "\u00a0"), "x")
    mixed = split_pairs(pairs[:2] + [variant], 0.1, 0.1, seed=7)
    parts = (mixed.train, mixed.valid, mixed.test)
    assert [variant in part for part in parts] == [pairs[0] in part for part in parts]

    other = split_pairs(pairs, valid_fraction=0.1, test_fraction=0.1, seed=8)
    assert {p.target for p in other.test} != {p.target for p in splits.test}


def test_split_validates_fractions() -> None:
    with pytest.raises(ScrivenError, match="test_fraction"):
        split_pairs(_pairs(4), test_fraction=-0.1)
    with pytest.raises(ScrivenError, match="valid_fraction"):
        split_pairs(_pairs(4), valid_fraction=0.6, test_fraction=0.5)


def _examples(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(4, 50) for _ in range(rng.randint(1, 30))],
             [rng.randrange(4, 50) for _ in range(rng.randint(1, 30))]) for _ in range(n)]


def test_token_batches_respect_budget_and_cover_everything() -> None:
    examples = _examples(500)
    batches = token_batches(examples, max_tokens=200, pad_id=0, seed=1, chunk_size=128)
    seen = sorted(i for b in batches for i in b.indices)
    assert seen == list(range(500))
    for b in batches:
        assert b.src.dtype == b.tgt.dtype == torch.long
        assert b.src.numel() <= 200 and b.tgt.numel() <= 200
        for row, i in enumerate(b.indices):
            src, tgt = examples[i]
            assert b.src[row, : len(src)].tolist() == src
            assert torch.all(b.src[row, len(src):] == 0)
            assert b.tgt[row, : len(tgt)].tolist() == tgt
    # Bucketing keeps padding low compared with batches of random neighbours.
    real = sum(len(s) + len(t) for s, t in examples)
    padded = sum(b.src.numel() + b.tgt.numel() for b in batches)
    assert padded < 1.6 * real


def test_token_batches_are_seeded() -> None:
    examples = _examples(300)
    a = token_batches(examples, max_tokens=150, seed=3)
    b = token_batches(examples, max_tokens=150, seed=3)
    c = token_batches(examples, max_tokens=150, seed=4)
    assert [x.indices for x in a] == [x.indices for x in b]
    assert [x.indices for x in a] != [x.indices for x in c]
    fixed = token_batches(examples, max_tokens=150, shuffle=False)
    longer = [max(map(len, examples[i])) for x in fixed for i in x.indices]
    assert longer == sorted(longer)  # sorted by the longer side, batch order kept


def test_token_batches_sort_the_whole_set_by_default() -> None:
    # Shuffled batches still each hold one stretch of the sorted lengths: no two batches'
    # ranges of longer sides overlap (beyond a shared boundary length), so padding stays low.
    examples = _examples(600, seed=2)
    spans = sorted((min(longer), max(longer)) for b in token_batches(examples, 120, seed=5)
                   for longer in [[max(map(len, examples[i])) for i in b.indices]])
    assert all(hi <= lo_next for (_, hi), (lo_next, _) in zip(spans, spans[1:]))
    chunked = token_batches(examples, 120, seed=5, chunk_size=100)
    padded = sum(b.src.numel() + b.tgt.numel() for b in token_batches(examples, 120, seed=5))
    assert padded < sum(b.src.numel() + b.tgt.numel() for b in chunked)


def test_token_batches_errors() -> None:
    with pytest.raises(ScrivenError, match="max_tokens"):
        token_batches([([5] * 10, [6] * 3)], max_tokens=8)
    with pytest.raises(ScrivenError, match="example 1"):
        token_batches([([5], [6]), ([], [6])], max_tokens=8)
    assert token_batches([], max_tokens=8) == []


def test_pad_sequences() -> None:
    assert pad_sequences([[1, 2, 3], [4]], pad_id=0).tolist() == [[1, 2, 3], [4, 0, 0]]
