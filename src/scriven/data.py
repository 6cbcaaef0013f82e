"""Datasets by name (download, verify, cache) and strict reading of the user's own text files."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import unicodedata
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ScrivenError

MIRROR_ENV = "SCRIVEN_DATA_MIRROR"
CACHE_ENV = "SCRIVEN_CACHE"
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Dataset:
    """A public text corpus known by name. `sha256` is of the file we keep (`filename`)."""

    name: str
    filename: str
    url: str
    sha256: str
    licence: str
    attribution: str
    description: str
    # When `url` is a zip archive: the member to extract. `sha256` is then the member's hash,
    # since that is the file we keep and the archive itself may be repacked upstream.
    member: str | None = None


# A constant table (data, not state); tests add entries with monkeypatch.setitem.
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            name="anna",
            filename="anna.txt",
            url="https://raw.githubusercontent.com/markhliu/DGAI/"
            "23700d3c924b194b591b6316bb12738193c8e38c/files/anna.txt",
            sha256="21c541bcbcc5d6e9075c1288d71ba871fb2fe2c3b942b6727b1ac095e347cce3",
            licence="public domain",
            attribution="Leo Tolstoy, Anna Karenina, translated by Constance Garnett "
            "(Project Gutenberg eBook #1399)",
            description="A novel in English (about 2 MB): training text for the word-level "
            "LSTM text generator.",
        ),
        Dataset(
            name="eng-fra",
            filename="eng-fra.tsv",
            url="https://raw.githubusercontent.com/IKRAMMES/projet-mla/"
            "9915d455b6ed0bedc84e88676548d6105f8904f4/src/models/fra-eng.zip",
            member="fra.txt",
            sha256="0bb85dbaa1c896844649094d7eaf2e34bee34e84fe362b26ce7e8f2e12aae104",
            licence="CC-BY 2.0 FR",
            attribution="www.manythings.org/anki and tatoeba.org",
            description="English-French sentence pairs from the Tatoeba Project via "
            "manythings.org/anki (one pair a line, tab-separated): training data for the "
            "Transformer translator. Keep the attribution when sharing data or models.",
        ),
    )
}


def list_datasets() -> list[Dataset]:
    """The registered datasets, sorted by name."""
    return [DATASETS[name] for name in sorted(DATASETS)]


def get_dataset(name: str) -> Dataset:
    """The registered dataset called `name`; an unknown name is an error listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ScrivenError(
            f"unknown dataset {name!r}; known datasets are {', '.join(sorted(DATASETS))}"
        ) from None


def cache_dir() -> Path:
    """Where downloaded datasets are kept: $SCRIVEN_CACHE, else the user cache folder/datasets.

    Read at call time so that tests and users can change it without re-importing."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured)
    import platformdirs  # only needed when no folder is configured

    return Path(platformdirs.user_cache_dir("scriven")) / "datasets"


def fetch(name: str) -> Path:
    """Path of dataset `name`: the mirror copy if $SCRIVEN_DATA_MIRROR holds it (taken as given,
    not hash-checked: the project's mirror keeps a trimmed eng-fra.tsv), else the cached copy,
    else a fresh download verified against its sha256."""
    dataset = get_dataset(name)
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        folder = Path(mirror)
        if not folder.is_dir():
            raise ScrivenError(f"{MIRROR_ENV}={mirror} is not a folder")
        candidate = folder / dataset.filename
        if candidate.is_file():
            return candidate
    target = cache_dir() / dataset.filename
    if target.is_file():
        return target
    _download(dataset, target, mirror)
    return target


def resolve_text_source(source: str) -> Path:
    """A registered dataset name (fetched) or an existing local file. A name wins over a file of
    the same name in the current folder; write `./anna` to mean the file."""
    if source in DATASETS:
        return fetch(source)
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        raise ScrivenError(f"{source}: is a folder, expected a text file or a dataset name")
    raise ScrivenError(
        f"{source!r} is neither a dataset name ({', '.join(sorted(DATASETS))}) nor an existing file"
    )


def _download(dataset: Dataset, target: Path, mirror: str | None) -> None:
    """Download into a temp file beside `target`, check the hash, then rename into place, so an
    interrupted or corrupt download never looks like a cached dataset."""
    folder = target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ScrivenError(f"cannot create the dataset cache folder {folder}: {e.strerror}") from e
    temps: list[Path] = []
    try:
        fetched = _temp_path(folder, target.name, temps)
        _urlretrieve(dataset, fetched, mirror)
        if dataset.member is None:
            kept = fetched
        else:
            kept = _temp_path(folder, target.name, temps)
            _extract_member(dataset, fetched, kept)
        digest = _sha256(kept)
        if digest != dataset.sha256:
            raise ScrivenError(
                f"dataset {dataset.name}: downloaded file has sha256 {digest}, expected "
                f"{dataset.sha256}; the download was discarded"
            )
        os.replace(kept, target)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def _temp_path(folder: Path, name: str, temps: list[Path]) -> Path:
    fd, raw = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    os.close(fd)
    temps.append(Path(raw))
    return Path(raw)


def _urlretrieve(dataset: Dataset, dest: Path, mirror: str | None) -> None:
    try:
        with urllib.request.urlopen(dataset.url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            with open(dest, "wb") as out:
                shutil.copyfileobj(response, out, _CHUNK)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        where = f" ({MIRROR_ENV}={mirror} has no {dataset.filename})" if mirror else ""
        raise ScrivenError(
            f"could not download dataset {dataset.name} from {dataset.url}: {reason}{where}; "
            f"without network access, set {MIRROR_ENV} to a folder holding {dataset.filename}"
        ) from e


def _extract_member(dataset: Dataset, archive: Path, dest: Path) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(dataset.member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, _CHUNK)
    except KeyError:
        raise ScrivenError(
            f"dataset {dataset.name}: {dataset.url} has no member {dataset.member!r}"
        ) from None
    except zipfile.BadZipFile as e:
        raise ScrivenError(f"dataset {dataset.name}: {dataset.url} is not a valid zip: {e}") from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write UTF-8 `text` to `path` via a temp file and `os.replace`: readers see the old file or
    the new one, never half of it."""
    path = Path(path)
    try:
        fd, raw = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise ScrivenError(f"cannot write {path}: {e.strerror}") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.replace(raw, path)
    except OSError as e:
        Path(raw).unlink(missing_ok=True)
        raise ScrivenError(f"cannot write {path}: {e.strerror}") from e
    except BaseException:
        Path(raw).unlink(missing_ok=True)
        raise


# Characters that look like something simpler and would otherwise split or hide vocabulary:
# "Cours\u202f!" and "Cours !" must tokenize alike, and "l’homme" like "l'homme".
_CHAR_MAP: dict[str, str] = {
    **dict.fromkeys("\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
                    "\u2009\u200a\u202f\u205f\u3000", " "),
    # Invisible characters that split words. ZWJ/ZWNJ are kept: emoji sequences and some
    # scripts need them.
    **dict.fromkeys("\u200b\u2060\ufeff\u00ad", ""),
    **dict.fromkeys("\u2018\u2019\u201a\u201b\u02bc", "'"),
    **dict.fromkeys("\u201c\u201d\u201e\u201f", '"'),
    # Other line breaks become "\n" so that text.split("\n") and text.splitlines() agree.
    **dict.fromkeys("\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029", "\n"),
}
_CHAR_RE = re.compile("[" + "".join(_CHAR_MAP) + "]")


_SPACES = re.compile(r"\s+")  # Python's \s covers the Unicode spaces too


def normalize_text(text: str, sentence: bool = False) -> str:
    """The one text normalisation (what `read_text` applies): LF line ends, NFC, plain spaces
    and ASCII quotes, no zero-width characters. Use it on prompts too, so they match the
    training text. `sentence`: also every run of whitespace one space, trimmed, so that one
    sentence typed two ways becomes one string (sentence pairs, translator input)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CHAR_RE.sub(lambda m: _CHAR_MAP[m.group()], text)
    if not unicodedata.is_normalized("NFC", text):
        # Decomposed accents ("e" + U+0301) would otherwise split words at the accent.
        text = unicodedata.normalize("NFC", text)
    return _SPACES.sub(" ", text).strip() if sentence else text


def normalization_steps() -> list[tuple[str, str]]:
    """`normalize_text`'s replacements as (regex, replacement), in its order, for a tokenizer
    that must carry the same normalisation inside itself (the BPE tokenizer's saved
    normalizer); NFC comes after them."""
    groups: dict[str, list[str]] = {}
    for char, replacement in _CHAR_MAP.items():
        groups.setdefault(replacement, []).append(char)
    return [("\r\n?", "\n")] + [("[" + "".join(chars) + "]", replacement)
                                for replacement, chars in groups.items()]


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file strictly and normalise it (see `normalize_text`). A missing,
    empty, binary or non-UTF-8 file is a ScrivenError naming the file and the position."""
    path = Path(path)
    if path.is_dir():
        raise ScrivenError(f"{path}: is a folder, expected a text file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ScrivenError(f"{path}: no such file") from None
    except OSError as e:
        raise ScrivenError(f"{path}: cannot read ({e.strerror})") from e
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ScrivenError(f"{path}: is UTF-16 (byte-order mark at offset 0); save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise ScrivenError(
            f"{path}: binary content (NUL byte at byte offset {nul}, line {line}); "
            "expected a UTF-8 text file"
        )
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        offset = bom + e.start
        line = data.count(b"\n", 0, offset) + 1
        raise ScrivenError(
            f"{path}: not valid UTF-8 at byte offset {offset} (line {line}, "
            f"byte 0x{data[offset]:02x})"
        ) from None
    text = normalize_text(text)
    if not text.strip():
        raise ScrivenError(f"{path}: file is empty" if not text else f"{path}: only whitespace")
    return text
