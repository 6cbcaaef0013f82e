"""Model families by checkpoint kind: the one registry of kinds. Building a model from its
config does no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..config import from_dict
from ..errors import ScrivenError
from .gpt import GPT, GPTConfig
from .lstm import LSTMConfig, LSTMLanguageModel
from .transformer import Transformer, TransformerConfig

Task = Literal["lm", "translate"]


@dataclass(frozen=True)
class ModelKind:
    """What a checkpoint kind is: its config and model classes, and the task it serves
    ("lm": continue text, "translate": English → French)."""

    config: type
    model: type[nn.Module]
    task: Task


KINDS: dict[str, ModelKind] = {
    "lstm": ModelKind(LSTMConfig, LSTMLanguageModel, "lm"),
    "gpt": ModelKind(GPTConfig, GPT, "lm"),
    "transformer": ModelKind(TransformerConfig, Transformer, "translate"),
}


def kinds_for(task: Task) -> tuple[str, ...]:
    """The checkpoint kinds that serve `task`, in registry order."""
    return tuple(kind for kind, entry in KINDS.items() if entry.task == task)


def build_model(kind: str, config: dict[str, Any]) -> nn.Module:
    """The untrained model of `kind` (a key of `KINDS`) for a saved config."""
    if kind not in KINDS:
        raise ScrivenError(f"unknown model kind {kind!r}; known: {', '.join(KINDS)}")
    entry = KINDS[kind]
    return entry.model(from_dict(entry.config, config, "model config"))
