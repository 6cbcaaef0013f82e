"""`scriven evaluate`: score any checkpoint on any text, whichever model family it is."""

from __future__ import annotations

from pathlib import Path

from . import checkpoint as ckpt_io


def evaluate(checkpoint: str | Path, text: str, device: str = "auto") -> dict:
    """Perplexity and bits per character for a text generator on a text; BLEU and chrF (with the
    sacrebleu signature) for a translator on a pair file."""
    kind = ckpt_io.load(checkpoint).kind
    if kind == "transformer":
        from .translation import evaluate_translation
        return evaluate_translation(checkpoint, text, device=device)
    from .lm import evaluate_lm
    return evaluate_lm(checkpoint, text, device=device)
