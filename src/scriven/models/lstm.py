"""Word-level LSTM language model: embedding -> stacked LSTM -> linear head over the vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import check, check_float, check_positive_int

LSTMState = tuple[Tensor, Tensor]  # (h, c), each (L, B, H)


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int
    embed_dim: int = 128
    hidden_dim: int = 128
    num_layers: int = 3
    dropout: float = 0.2
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        check_positive_int(self.vocab_size, "vocab_size")
        check_positive_int(self.embed_dim, "embed_dim")
        check_positive_int(self.hidden_dim, "hidden_dim")
        check_positive_int(self.num_layers, "num_layers")
        check_float(self.dropout, "dropout", 0.0, 1.0, high_open=True)
        check(isinstance(self.tie_embeddings, bool), "tie_embeddings", "must be true or false")

    @classmethod
    def preset(cls, name: str, vocab_size: int) -> LSTMConfig:
        check(name in LSTM_PRESETS, "preset", f"must be one of {', '.join(LSTM_PRESETS)}, got {name!r}")
        return cls(vocab_size=vocab_size, **LSTM_PRESETS[name])


# "seed" is the book's model (Learn Generative AI with PyTorch, ch. 8.5). "default" was chosen by
# measuring validation perplexity per CPU minute on Anna Karenina and generation speed (see
# bench/lm_presets.py and README): "large" reaches a few percent lower perplexity in the same
# minutes, but its 7 MB of int8 weights per token no longer fit in two cores' caches, and it
# generates at about half the speed.
LSTM_PRESETS: dict[str, dict] = {
    "seed": dict(embed_dim=128, hidden_dim=128, num_layers=3, dropout=0.2, tie_embeddings=False),
    "default": dict(embed_dim=256, hidden_dim=256, num_layers=2, dropout=0.3, tie_embeddings=True),
    "large": dict(embed_dim=384, hidden_dim=384, num_layers=2, dropout=0.4, tie_embeddings=True),
    "tiny": dict(embed_dim=32, hidden_dim=32, num_layers=1, dropout=0.0, tie_embeddings=False),
    # Sized for a GPU, where a wider recurrence costs little more time per step.
    "gpu": dict(embed_dim=512, hidden_dim=1024, num_layers=2, dropout=0.4, tie_embeddings=True),
}


class LSTMLanguageModel(nn.Module):
    carries_state = True  # the (h, c) state flows from one training window to the next

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.drop = nn.Dropout(c.dropout)
        # When tied, the LSTM projects its hidden state down to the embedding size, so the head
        # can reuse the embedding matrix: fewer parameters and a cheaper softmax.
        proj = c.embed_dim if c.tie_embeddings and c.embed_dim != c.hidden_dim else 0
        self.lstm = nn.LSTM(c.embed_dim, c.hidden_dim, c.num_layers, batch_first=True,
                            dropout=c.dropout if c.num_layers > 1 else 0.0, proj_size=proj)
        out_dim = proj or c.hidden_dim
        self.head = nn.Linear(out_dim, c.vocab_size)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(self, ids: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        x = self.drop(self.embed(ids))            # (B, T, E)
        y, state = self.lstm(x, state)            # (B, T, H'), ((L, B, H'), (L, B, H))
        return self.head(self.drop(y)), state     # (B, T, V)

    def initial_state(self, batch_size: int, device: torch.device | str = "cpu") -> LSTMState:
        c = self.config
        out_dim = self.lstm.proj_size or c.hidden_dim
        h = torch.zeros(c.num_layers, batch_size, out_dim, device=device)
        return h, torch.zeros(c.num_layers, batch_size, c.hidden_dim, device=device)
