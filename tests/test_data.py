"""Datasets by name (mirror, cache, verified download from file:// URLs) and strict text reading."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import platformdirs
import pytest

from scriven import data
from scriven.data import (
    DATASETS,
    Dataset,
    cache_dir,
    fetch,
    list_datasets,
    normalize_text,
    read_text,
    resolve_text_source,
    write_text_atomic,
)
from scriven.errors import ScrivenError

TINY = b"Happy families are all alike.\nEvery unhappy family is unhappy in its own way.\n"


def sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test may reach the network or the real cache: point both at tmp_path."""
    monkeypatch.delenv("SCRIVEN_DATA_MIRROR", raising=False)
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path / "cache"))


def register(monkeypatch, url: str, digest: str, member: str | None = None) -> Dataset:
    dataset = Dataset(name="tiny", filename="tiny.txt", url=url, sha256=digest, licence="CC0",
                      attribution="the tests", description="test only", member=member)
    monkeypatch.setitem(DATASETS, "tiny", dataset)
    return dataset


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- registry ---------------------------------------------------------------------------------


def test_registry_entries():
    names = [d.name for d in list_datasets()]
    assert names == sorted(names) and {"anna", "eng-fra"} <= set(names)
    anna, pairs = DATASETS["anna"], DATASETS["eng-fra"]
    assert anna.filename == "anna.txt" and anna.licence == "public domain"
    assert anna.sha256 == "21c541bcbcc5d6e9075c1288d71ba871fb2fe2c3b942b6727b1ac095e347cce3"
    assert pairs.filename == "eng-fra.tsv" and pairs.member == "fra.txt"
    assert pairs.sha256 == "0bb85dbaa1c896844649094d7eaf2e34bee34e84fe362b26ce7e8f2e12aae104"
    assert pairs.licence == "CC-BY 2.0 FR"
    assert pairs.attribution == "www.manythings.org/anki and tatoeba.org"
    for d in DATASETS.values():
        assert d.url.startswith("https://") and len(d.sha256) == 64
    with pytest.raises(AttributeError):  # frozen
        anna.url = "http://example.com"  # type: ignore[misc]


def test_unknown_name_lists_known_names():
    with pytest.raises(ScrivenError, match="unknown dataset 'nope'.*anna, eng-fra"):
        fetch("nope")


# --- mirror and cache -------------------------------------------------------------------------


def test_mirror_file_is_returned_as_given_without_hash_check(monkeypatch, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "eng-fra.tsv").write_text("Go.\tVa !\n", encoding="utf-8")  # not the real hash
    monkeypatch.setenv("SCRIVEN_DATA_MIRROR", str(mirror))
    assert fetch("eng-fra") == mirror / "eng-fra.tsv"
    assert resolve_text_source("eng-fra") == mirror / "eng-fra.tsv"


def test_mirror_that_is_not_a_folder_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRIVEN_DATA_MIRROR", str(tmp_path / "missing"))
    with pytest.raises(ScrivenError, match="SCRIVEN_DATA_MIRROR"):
        fetch("anna")


def test_download_checks_hash_and_caches(monkeypatch, tmp_path):
    source = tmp_path / "upstream.txt"
    source.write_bytes(TINY)
    register(monkeypatch, source.as_uri(), sha(TINY))
    path = fetch("tiny")
    assert path == tmp_path / "cache" / "tiny.txt"
    assert path.read_bytes() == TINY
    assert leftovers(path.parent) == ["tiny.txt"]  # no temp files left behind
    source.unlink()  # a second call must use the cache, not download again
    assert fetch("tiny") == path


def test_hash_mismatch_is_an_error_and_leaves_nothing(monkeypatch, tmp_path):
    source = tmp_path / "upstream.txt"
    source.write_bytes(TINY + b"tampered")
    register(monkeypatch, source.as_uri(), sha(TINY))
    with pytest.raises(ScrivenError, match="sha256"):
        fetch("tiny")
    assert leftovers(tmp_path / "cache") == []


def test_zip_member_is_verified_and_extracted(monkeypatch, tmp_path):
    archive = tmp_path / "fra-eng.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("_about.txt", "about")
        zf.writestr("fra.txt", TINY)
    register(monkeypatch, archive.as_uri(), sha(TINY), member="fra.txt")
    path = fetch("tiny")
    assert path.read_bytes() == TINY
    assert leftovers(path.parent) == ["tiny.txt"]


def test_zip_without_member_is_an_error(monkeypatch, tmp_path):
    archive = tmp_path / "fra-eng.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("other.txt", TINY)
    register(monkeypatch, archive.as_uri(), sha(TINY), member="fra.txt")
    with pytest.raises(ScrivenError, match="fra.txt"):
        fetch("tiny")
    assert leftovers(tmp_path / "cache") == []


def test_network_failure_suggests_the_mirror(monkeypatch, tmp_path):
    register(monkeypatch, (tmp_path / "absent.txt").as_uri(), sha(TINY))
    with pytest.raises(ScrivenError, match="could not download dataset tiny.*SCRIVEN_DATA_MIRROR"):
        fetch("tiny")
    assert leftovers(tmp_path / "cache") == []


def test_mirror_without_the_file_falls_back_to_the_cache(monkeypatch, tmp_path):
    (tmp_path / "mirror").mkdir()
    monkeypatch.setenv("SCRIVEN_DATA_MIRROR", str(tmp_path / "mirror"))
    source = tmp_path / "upstream.txt"
    source.write_bytes(TINY)
    register(monkeypatch, source.as_uri(), sha(TINY))
    assert fetch("tiny") == tmp_path / "cache" / "tiny.txt"


def test_environment_is_read_at_call_time(monkeypatch, tmp_path):
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.setenv("SCRIVEN_CACHE", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "b"
    monkeypatch.delenv("SCRIVEN_CACHE")
    assert cache_dir() == Path(platformdirs.user_cache_dir("scriven")) / "datasets"


# --- resolve_text_source ----------------------------------------------------------------------


def test_resolve_local_file_and_bad_source(tmp_path):
    text = tmp_path / "mine.txt"
    text.write_text("hello\n", encoding="utf-8")
    assert resolve_text_source(str(text)) == text
    with pytest.raises(ScrivenError, match="'nothing-here.txt' is neither a dataset name"):
        resolve_text_source("nothing-here.txt")
    with pytest.raises(ScrivenError, match="is a folder"):
        resolve_text_source(str(tmp_path))


# --- read_text --------------------------------------------------------------------------------


def write(tmp_path: Path, payload: bytes, name: str = "t.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(payload)
    return path


def test_read_text_missing_file(tmp_path):
    with pytest.raises(ScrivenError, match="absent.txt: no such file"):
        read_text(tmp_path / "absent.txt")


@pytest.mark.parametrize("payload", [b"", b"  \n\r\n\t ", b"\xef\xbb\xbf"])
def test_read_text_empty_or_blank(tmp_path, payload):
    with pytest.raises(ScrivenError, match=r"t\.txt: (file is empty|only whitespace)"):
        read_text(write(tmp_path, payload))


def test_read_text_binary_reports_offset(tmp_path):
    path = write(tmp_path, b"line one\nab\x00cd")
    with pytest.raises(ScrivenError, match=r"t\.txt: binary content \(NUL byte at byte offset 11, line 2\)"):
        read_text(path)


def test_read_text_bad_utf8_reports_offset_and_line(tmp_path):
    path = write(tmp_path, b"first\nsecond caf\xe9 ok\n")  # a Latin-1 é
    with pytest.raises(ScrivenError, match=r"t\.txt: not valid UTF-8 at byte offset 16 \(line 2"):
        read_text(path)


def test_read_text_utf16_is_named(tmp_path):
    path = write(tmp_path, "hello".encode("utf-16"))
    with pytest.raises(ScrivenError, match="UTF-16"):
        read_text(path)


def test_read_text_normalises(tmp_path):
    raw = (
        "\ufeffOne\r\nTwo\rThree\n"                        # BOM, CRLF, CR
        "Cours\u202f! a\u00a0b c\u2009d e\u2007f\n"          # unicode spaces
        "zero\u200bwidth\ufeff\n"                            # zero-width characters
        "l\u2019homme \u2018x\u2019 \u201cquoted\u201d\n"    # curly quotes
        "cafe\u0301\ttab\n"                                  # decomposed accent; tab kept
    )
    assert read_text(write(tmp_path, raw.encode())) == (
        "One\nTwo\nThree\nCours ! a b c d e f\nzerowidth\nl'homme 'x' \"quoted\"\ncafé\ttab\n"
    )


def test_normalize_text_keeps_plain_text_and_emoji_sequences():
    plain = "Go.\tVa !\nHi.\tSalut !\n"
    assert normalize_text(plain) == plain
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # ZWJ sequence stays intact
    assert normalize_text(family) == family


def test_write_text_atomic(tmp_path):
    target = tmp_path / "out.json"
    write_text_atomic(target, "one\n")
    write_text_atomic(target, "two\n")
    assert target.read_text(encoding="utf-8") == "two\n"
    assert leftovers(tmp_path) == ["out.json"]
    with pytest.raises(ScrivenError, match="cannot write"):
        write_text_atomic(tmp_path / "no" / "such" / "dir.json", "x")


def test_module_has_no_path_globals():
    # Paths come from the environment at call time, never from import-time constants.
    assert not [v for v in vars(data).values() if isinstance(v, Path)]
