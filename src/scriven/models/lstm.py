"""Word-level LSTM language model: embedding -> stacked LSTM -> linear head over the vocabulary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native
from ..config import check, check_float, check_positive_int
from ..precision import FrozenLinear, check_precision

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


class LSTMStepper:
    """A trained LSTM language model laid out for generation, one token per call.

    nn.LSTM's per-call set-up costs more than a one-token step itself, so each layer here is one
    `torch.lstm_cell` call (in fp32), or, where its weights are held in lower precision (see
    `scriven.precision`), one matmul for all four gates (input and hidden matrices side by side,
    gates reordered input, forget, output | cell so one sigmoid and one tanh cover them). Lower
    precision applies to the output layer and to layers of at least `LOW_PRECISION_MIN` weights:
    a small layer is read quickly in fp32, and casting its input would cost more than it saves.
    With fp32 the numbers are the model's own, up to summation order.

    In int8, a step runs through the native kernels where this CPU has them (`scriven.native`):
    the whole step is one call, and each layer and the head rounds its input to 8 bits, so all
    dot products are byte products (on the AMX tile units for batches)."""

    LOW_PRECISION_MIN = 1 << 20

    def __init__(self, model: LSTMLanguageModel, precision: str = "fp32") -> None:
        self.model = model
        self.config = model.config
        check_precision(precision)
        self.native = _native_int8(model) if precision == "int8" else None
        self.layers: list[_CellLayer | _GateLayer] = []
        self.head: Callable[[Tensor], Tensor]                        # (B, H') -> (B, V)
        if self.native is not None:  # the kernels hold their own copy of the weights
            self.head = self.native.head_logits
            return
        lstm = model.lstm
        for k in range(self.config.num_layers):
            w_ih, w_hh = getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}")
            b_ih, b_hh = getattr(lstm, f"bias_ih_l{k}"), getattr(lstm, f"bias_hh_l{k}")
            proj = getattr(lstm, f"weight_hr_l{k}", None)
            small = w_ih.numel() + w_hh.numel() < self.LOW_PRECISION_MIN
            if proj is None and (precision == "fp32" or small):
                self.layers.append(_CellLayer(w_ih, w_hh, b_ih, b_hh))
            else:
                self.layers.append(_GateLayer(w_ih, w_hh, b_ih + b_hh, proj,
                                              "fp32" if small else precision))
        self.embed = model.embed.weight.detach()
        self.head = FrozenLinear(model.head.weight, model.head.bias, precision)

    def read(self, ids: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """Read a prompt (B, T) in one pass -> logits for the token after it (B, V), and the state."""
        y, state = self.model.lstm(self.model.embed(ids), state)   # (B, T, H')
        return self.head(y[:, -1]), state                           # (B, V)

    def step(self, ids: Tensor, state: LSTMState) -> tuple[Tensor, LSTMState]:
        """Feed one token per row, ids (B,) -> logits for the next one (B, V), and the state."""
        h, c = state                                                # (L, B, H'), (L, B, H)
        if self.native is not None:
            logits, h, c = self.native(ids, h, c)                   # (B, V), (L, B, H) each
            return logits, (h, c)
        x = F.embedding(ids, self.embed)                            # (B, E)
        hs, cs = [], []
        for k, layer in enumerate(self.layers):
            x, c_k = layer(x, h[k], c[k])                           # (B, H'), (B, H)
            hs.append(x)
            cs.append(c_k)
        return self.head(x), (torch.stack(hs), torch.stack(cs))


def _native_int8(model: LSTMLanguageModel) -> native.LSTMStepInt8 | None:
    """The int8 step through `scriven.native`, where it can run here."""
    lstm = model.lstm
    lib = native.library() if lstm.proj_size == 0 and model.head.weight.device.type == "cpu" else None
    if lib is None:
        return None
    layers = [(getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}"),
               getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}"))
              for k in range(lstm.num_layers)]
    return native.LSTMStepInt8(lib, model.embed.weight, layers, model.head.weight, model.head.bias)


class _CellLayer:
    """One LSTM layer in fp32 as a single fused call."""

    def __init__(self, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> None:
        self.weights = tuple(w.detach().contiguous() for w in (w_ih, w_hh, b_ih, b_hh))

    def __call__(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        return torch.lstm_cell(x, (h, c), *self.weights)           # (B, H), (B, H)


class _GateLayer:
    """One LSTM layer as a gate matmul in some precision, then the cell update in fp32."""

    def __init__(self, w_ih: Tensor, w_hh: Tensor, bias: Tensor, proj: Tensor | None,
                 precision: str) -> None:
        n = self.hidden = w_ih.size(0) // 4
        order = torch.cat([torch.arange(0, 2 * n), torch.arange(3 * n, 4 * n),
                           torch.arange(2 * n, 3 * n)]).to(w_ih.device)
        self.gates = FrozenLinear(torch.cat([w_ih, w_hh], 1)[order], bias[order], precision)
        self.proj = None if proj is None else FrozenLinear(proj, None, precision)

    def __call__(self, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        n = self.hidden
        gates = self.gates(torch.cat([x, h], 1))                    # (B, 4H): i, f, o | g
        s = gates[:, : 3 * n].sigmoid()
        c = torch.addcmul(s[:, n : 2 * n] * c, s[:, :n], gates[:, 3 * n :].tanh())
        h = s[:, 2 * n :] * c.tanh()                                # (B, H)
        return (h if self.proj is None else self.proj(h)), c
