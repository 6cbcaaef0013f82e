"""A trained translator at work: load it once, translate with greedy or beam search, and read
its attention. The inference half of the translator, as `generation.py` is the language
model's; training and evaluation are in `translation.py`."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import accel, runtimes
from . import checkpoint as ckpt_io
from .config import check, check_float, check_positive_int
from .device import resolve_device
from .errors import ScrivenError
from .export import is_export
from .models import kinds_for
from .models.transformer import Transformer
from .pairs import (
    encode_sources,
    pad_sequences,
)
from .precision import check_precision, hold_linears
from .search import beam_search, greedy_search, length_batches, output_limit
from .tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer

(KIND,) = kinds_for("translate")  # the checkpoint kind a translator is saved as

# ---------------------------------------------------------------------------------------------
# Decoding


Hypotheses = list[tuple[list[int], float | None]]  # n-best (token ids, score); greedy: no score


def default_max_len(model: Transformer, source_len: int) -> int:
    """Output length limit when none is given (see `search.output_limit`)."""
    return output_limit(model.config.max_len, source_len)


def search_ids(model: Transformer, sources: Sequence[Sequence[int]], beam: int = 1,
               n_best: int = 1, length_penalty: float = 1.0, max_len: int | None = None,
               batch_size: int = 64) -> list[Hypotheses]:
    """Decode many sources: sorted by length into batches of `batch_size` sentences (little
    padding), greedy for beam 1, else beam search; results in input order.

    Each sentence gets what it would get alone: greedy stops each sentence at its own limit;
    beam search, whose result depends on the limit, only batches sentences that share one."""
    device = next(model.parameters()).device
    limits = [max_len or default_max_len(model, len(s)) for s in sources]
    results: list[Hypotheses] = [[] for _ in sources]
    for rows in length_batches(sources, limits, beam, batch_size):
        src = pad_sequences([sources[i] for i in rows], PAD_ID).to(device)  # (B, S)
        limit = limits[rows[0]]  # beam batches share it
        if beam == 1:
            found: list[Hypotheses] = [[(ids, None)] for ids in greedy_search(
                model, src, BOS_ID, EOS_ID, [limits[i] for i in rows])]
        else:
            found = [list(h) for h in beam_search(model, src, beam, BOS_ID, EOS_ID, limit,
                                                  length_penalty, n_best)]
        for i, hyps in zip(rows, found):
            results[i] = hyps
    return results


def translation_text(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Natural text for a translation's output ids: specials and <unk> dropped, and any stray
    byte pieces that do not form a character (the replacement character) removed."""
    text = tok.decode([i for i in ids if i != UNK_ID])
    return text.replace("\ufffd", "").strip()


# ---------------------------------------------------------------------------------------------
# Training



# ---------------------------------------------------------------------------------------------
# Translating


@dataclass
class LoadedTranslator:
    """A translator ready to use: load once, translate many times (the server does)."""

    model: Transformer
    tokenizer: Tokenizer
    device: torch.device
    path: Path | None = None
    data: dict[str, Any] = field(default_factory=dict)  # the checkpoint's data notes
    precision: str = "fp32"  # how the linear layers hold their weights (`scriven.precision`)

    @classmethod
    def load(cls, checkpoint: str | Path, device: str = "auto",
             precision: str = "fp32") -> LoadedTranslator:
        check_precision(precision)
        dev = resolve_device(device)
        model, tok, ckpt = ckpt_io.load_model(checkpoint, dev, kinds=(KIND,))
        accel.apply(model, dev, "infer")
        hold_linears(model, precision)
        return cls(model, tok, dev, ckpt.path, dict(ckpt.config.get("data") or {}), precision)

    @property
    def max_len(self) -> int:
        return self.model.config.max_len

    def encode_sources(self, texts: Sequence[str], names: Sequence[str] | None = None
                       ) -> tuple[list[list[int]], list[int]]:
        """Normalised source ids, and the indices of sources cut to the model's max_len (see
        `pairs.encode_sources`)."""
        return encode_sources(self.tokenizer, self.max_len, texts, names)


def loaded_translator(checkpoint: str | Path | LoadedTranslator, device: str,
                      precision: str | None = None) -> LoadedTranslator:
    """`checkpoint` itself if already loaded, else the translator (or export) it names;
    `precision` None means fp32, or a loaded translator's own."""
    if precision is not None:
        check_precision(precision)
    if isinstance(checkpoint, LoadedTranslator):
        if precision is not None and precision != checkpoint.precision:
            raise ScrivenError(f"precision {precision!r} asked of a translator loaded in "
                               f"{checkpoint.precision!r}; load it with LoadedTranslator.load("
                               f"..., precision={precision!r})")
        return checkpoint
    exported = isinstance(checkpoint, runtimes.CT2Translator) or is_export(checkpoint)
    if exported and precision not in (None, "fp32"):
        raise ScrivenError("an export keeps the precision it was exported in; "
                           "export again with --quantization int8 instead")
    if isinstance(checkpoint, runtimes.CT2Translator):
        return checkpoint
    if exported:  # an exported translator runs on CTranslate2
        return runtimes.load_translator(checkpoint, device)
    return LoadedTranslator.load(checkpoint, device, precision or "fp32")


def check_search(beam: int, n_best: int, length_penalty: float, max_len: int | None,
                  batch_size: int) -> None:
    check_positive_int(beam, "beam")
    check_positive_int(n_best, "n_best")
    check(n_best <= beam, "n_best", f"must be at most beam ({beam}), got {n_best}")
    check_float(length_penalty, "length_penalty", 0.0, 10.0)
    if max_len is not None:
        check_positive_int(max_len, "max_len")
    check_positive_int(batch_size, "batch_size")


def warn_cut(tr: LoadedTranslator, cut: list[int], names: Sequence[str] | None) -> None:
    if cut:
        shown = ", ".join((names[i] if names is not None else f"text[{i}]") for i in cut[:3])
        more = " ..." if len(cut) > 3 else ""
        warnings.warn(f"{len(cut)} source(s) longer than the model's max_len ({tr.max_len} "
                      f"tokens) were cut to it: {shown}{more}", stacklevel=3)


def translate(checkpoint: str | Path | LoadedTranslator, text: str | Sequence[str], beam: int = 1,
              n_best: int = 1, length_penalty: float = 1.0, max_len: int | None = None,
              batch_size: int = 64, device: str = "auto", names: Sequence[str] | None = None,
              precision: str | None = None) -> Any:
    """Translate one sentence (`text` a str → a str) or many (a list → a list, same order).

    beam: 1 is greedy search, more is beam search of that width; n_best (≤ beam): return the
    n best hypotheses per sentence as lists of (text, score), score = log P / GNMT length
    penalty with exponent `length_penalty`; max_len: the longest output in tokens (default
    `default_max_len`: about twice the source plus 10, at most the model's max_len); batch_size:
    sentences decoded together (sorted by length first). `names` label the sentences in error
    messages (e.g. "line 3"); default text[i]. precision: fp32 (the default: the model's own
    numbers), bf16 or int8: how the linear layers hold their weights (see `scriven.precision`);
    int8 decodes faster on CPUs, and a few translations may change.

    Sources are normalised like the training data. An empty source is an error naming it. A
    source longer than the model's max_len tokens is cut to its first max_len tokens, with a
    warning. Characters never seen in training (emoji too) are read as bytes or <unk>; <unk>
    and undecodable pieces are left out of the output.
    """
    check_search(beam, n_best, length_penalty, max_len, batch_size)
    single = isinstance(text, str)
    if not single and not isinstance(text, Sequence):
        raise ScrivenError(f"text must be a string or a list of strings, got {type(text).__name__}")
    sentences = [text] if single else list(text)
    if names is not None and len(names) != len(sentences):
        raise ScrivenError(f"names has {len(names)} entries for {len(sentences)} sentences")
    tr = loaded_translator(checkpoint, device, precision)
    if max_len is not None:
        check(max_len <= tr.max_len, "max_len",
              f"must be at most the model's max_len ({tr.max_len}), got {max_len}")
    if single and names is None:
        names = ["text"]
    ids, cut = tr.encode_sources(sentences, names)
    warn_cut(tr, cut, names)
    if isinstance(tr, runtimes.CT2Translator):
        found = tr.search_ids(ids, beam, n_best, length_penalty, max_len, batch_size)
    else:
        found = search_ids(tr.model, ids, beam, n_best, length_penalty, max_len, batch_size)
    if n_best == 1:
        out: list[Any] = [translation_text(tr.tokenizer, h[0][0]) for h in found]
    else:
        out = [[(translation_text(tr.tokenizer, ids_), float(score or 0.0)) for ids_, score in h]
               for h in found]
    return out[0] if single else out


ATTENTION_KINDS = ("encoder_self", "decoder_self", "cross")


@dataclass
class Attention:
    """Every attention map of one translation (see `read_attention`)."""

    source_tokens: list[str]
    decoder_tokens: list[str]  # <bos> + target: what the decoder reads
    target_tokens: list[str]   # target + <eos>: what each decoder position predicts
    translation: str
    maps: dict[str, list[Tensor]]  # kind -> per layer (heads, queries, keys), rows sum to 1
    cut: bool = False              # the target was cut to fit the model's max_len


def read_attention(tr: LoadedTranslator, src: Sequence[int], tgt: Sequence[int]) -> Attention:
    """The attention maps of the model reading source ids `src` and, teacher-forced, target
    ids `tgt` (without <bos>/<eos>), for each of `ATTENTION_KINDS`: encoder_self (source ×
    source), decoder_self (decoder input × decoder input, masked) and cross (predicted token ×
    source). The one truncation rule: a target longer than max_len - 1 tokens is cut to that
    (<bos> takes one position) and `cut` says so; sources come cut by `encode_sources`."""
    tgt = list(tgt)
    cut = len(tgt) > tr.max_len - 1
    tgt = tgt[: tr.max_len - 1]
    src_t = torch.tensor([list(src)], device=tr.device)                    # (1, S)
    tgt_in = torch.tensor([[BOS_ID, *tgt]], device=tr.device)               # (1, T)
    with torch.inference_mode():
        maps = tr.model.attention_maps(src_t, tgt_in)
    tok = tr.tokenizer
    return Attention([tok.id_to_token(i) for i in src],
                     [tok.id_to_token(i) for i in [BOS_ID, *tgt]],
                     [tok.id_to_token(i) for i in [*tgt, EOS_ID]],
                     translation_text(tok, tgt),
                     {k: [m[0].float().cpu() for m in maps[k]] for k in ATTENTION_KINDS}, cut)


@dataclass
class CrossAttention:
    """Cross-attention of one translation. Row t of each map is the decoder position that
    reads <bos> + target[:t] and predicts `target_tokens[t]` (the last one is <eos>); columns
    are `source_tokens`. Rows sum to 1."""

    source_tokens: list[str]
    target_tokens: list[str]
    translation: str
    cross: Tensor  # (layers, heads, target, source)

    @classmethod
    def of(cls, found: Attention) -> CrossAttention:
        return cls(found.source_tokens, found.target_tokens, found.translation,
                   torch.stack(found.maps["cross"]))                        # (L, H, T, S)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: maps as nested lists [layer][head][target][source]."""
        return {"source_tokens": self.source_tokens, "target_tokens": self.target_tokens,
                "translation": self.translation, "cross": self.cross.tolist()}


def attention(checkpoint: str | Path | LoadedTranslator, source: str, target: str | None = None,
              device: str = "auto") -> CrossAttention:
    """Tokens and per-layer, per-head cross-attention for translating `source`: into the
    model's own greedy translation when `target` is None, else into `target` (teacher forced).
    Both are cut to fit the model's max_len (see `read_attention`), with a warning."""
    return CrossAttention.of(all_attention(checkpoint, source, target, device))


def all_attention(checkpoint: str | Path | LoadedTranslator, source: str,
                  target: str | None = None, device: str = "auto") -> Attention:
    """Every attention map (`read_attention`) for translating `source`, into the model's own
    greedy translation or into `target`, with a warning for whatever was cut."""
    tr = loaded_translator(checkpoint, device)
    (src,), cut = tr.encode_sources([source], ["source"])
    if cut:
        warnings.warn(f"source is longer than the model's max_len ({tr.max_len} tokens); "
                      "it was cut", stacklevel=3)
    if target is None:
        tgt = search_ids(tr.model, [src])[0][0][0]
    else:
        (tgt,), _ = tr.encode_sources([target], ["target"])
    found = read_attention(tr, src, tgt)
    if found.cut:
        warnings.warn(f"{'target' if target is not None else 'the translation'} is longer than "
                      f"the model's max_len ({tr.max_len} tokens) allows; it was cut",
                      stacklevel=3)
    return found


