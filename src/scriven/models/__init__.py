"""Model families by checkpoint kind. Building a model from its config does no I/O."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import from_dict
from ..errors import ScrivenError


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """The untrained model of `kind` ("lstm", "transformer", "gpt") for a saved config."""
    if kind == "lstm":
        from .lstm import LSTMConfig, LSTMLanguageModel
        return LSTMLanguageModel(from_dict(LSTMConfig, config, "model config"))
    if kind == "transformer":
        from .transformer import Transformer, TransformerConfig
        return Transformer(from_dict(TransformerConfig, config, "model config"))
    if kind == "gpt":
        from .gpt import GPT, GPTConfig
        return GPT(from_dict(GPTConfig, config, "model config"))
    raise ScrivenError(f"unknown model kind {kind!r}")
