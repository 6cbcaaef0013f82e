"""How the LSTM `default` preset was chosen: train each candidate for the same wall-clock budget on
the benchmark's split of Anna Karenina and compare validation perplexity. Prints JSON.

    SCRIVEN_DATA_MIRROR=../shared/data python bench/lm_presets.py --minutes 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from lm import seed_split, train  # noqa: E402

from scriven.data import fetch, read_text  # noqa: E402
from scriven.device import tune_process_for_training  # noqa: E402
from scriven.lm import (  # noqa: E402
    LMTask,
    LMTrainConfig,  # noqa: E402
    chars_per_token,
)
from scriven.models.lstm import LSTMConfig, LSTMLanguageModel  # noqa: E402

CANDIDATES = {
    "256x2-tied": dict(embed_dim=256, hidden_dim=256, num_layers=2, dropout=0.3, tie_embeddings=True),
    "384x2-tied": dict(embed_dim=384, hidden_dim=384, num_layers=2, dropout=0.4, tie_embeddings=True),
    "512x1-tied": dict(embed_dim=512, hidden_dim=512, num_layers=1, dropout=0.4, tie_embeddings=True),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--only", nargs="*", default=list(CANDIDATES))
    args = ap.parse_args()
    tune_process_for_training()  # as the CLI does: measure what `scriven train` runs
    tok, train_ids, valid_ids, valid_words = seed_split(read_text(fetch("anna")))
    cpt = chars_per_token(tok, valid_words)
    workdir = Path(tempfile.mkdtemp(prefix="scriven-presets-"))
    results = {}
    for name in args.only:
        torch.manual_seed(0)
        model = LSTMLanguageModel(LSTMConfig(vocab_size=tok.vocab_size, **CANDIDATES[name]))
        config = LMTrainConfig(minutes=args.minutes, lr=3e-3, warmup_steps=100, eval_every=100)
        task = LMTask(train_ids, valid_ids, cpt, 32, 64, torch.device("cpu"))
        result, points, _ = train(name, model, task, config, tok, workdir)
        results[name] = {"best_valid_ppl": min(p for _, p in points),
                         "tokens_per_s": round(result.tokens_per_second), "curve": points}
    print(json.dumps({"bench": "lm_presets", "minutes": args.minutes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
