"""scriven: train, evaluate, inspect and serve small generative text models on your own text.

The public functions can be used from the package itself; each loads its module on first use,
so `import scriven` stays quick:

    scriven.train_lm, scriven.generate, scriven.generate_stream, scriven.evaluate,
    scriven.train_translate, scriven.translate, scriven.fetch, scriven.list_datasets
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "train_lm": "lm", "evaluate_lm": "lm",
    "generate": "generation", "generate_stream": "generation", "LoadedLM": "generation",
    "evaluate": "evaluation",
    "train_translate": "translation", "translate": "translator",
    "LoadedTranslator": "translator", "evaluate_translation": "translation",
    "fetch": "data", "list_datasets": "data", "read_text": "data",
    "TrainConfig": "train", "LMTrainConfig": "lm", "TranslateTrainConfig": "translation",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'scriven' has no attribute {name!r}")
    return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
