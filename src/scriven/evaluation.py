"""`scriven evaluate`: score any checkpoint on any text, whichever model family it is."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt_io
from .errors import ScrivenError
from .models import kinds_for


def evaluate(checkpoint: str | Path, text: str, device: str = "auto", beam: int = 1,
             length_penalty: float = 1.0, split: str = "test", precision: str | None = None
             ) -> dict:
    """Perplexity and bits per character for a text generator on a text; BLEU and chrF (with the
    sacrebleu signature) for a translator on a pair file, decoded with `beam`,
    `length_penalty` and its weights held in `precision` (as in `translate`), on the held-out
    `split` (test or valid) when the pair file is the translator's own training data."""
    kind = ckpt_io.load(checkpoint).kind
    if kind in kinds_for("translate"):
        from .translation import evaluate_translation
        return evaluate_translation(checkpoint, text, device=device, beam=beam,
                                    length_penalty=length_penalty, split=split,
                                    precision=precision)
    for name, value, default in (("beam", beam, 1), ("length_penalty", length_penalty, 1.0),
                                 ("split", split, "test"), ("precision", precision, None)):
        if value != default:
            raise ScrivenError(f"{name} applies to translators; {checkpoint} is a text generator")
    from .lm import evaluate_lm
    return evaluate_lm(checkpoint, text, device=device)
