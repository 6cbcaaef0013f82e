"""Language models laid out for generation, one token per call: `read` a prompt (B, T), then
`step` one token per row (B,), carrying a state. Generation (`generation.sample_ids`) and the
server's continuous batching (`serve.batching`) drive any stepper the same way, an exported
model's `runtimes.OnnxStepper` included. The server also regroups rows: `select` keeps some rows
of a state (repeats allowed), `join` stacks two states' rows, or says it cannot (None)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import accel
from .attention import KVCache
from .models.gpt import GPT, GPTCache
from .models.lstm import LSTMLanguageModel, LSTMState
from .precision import FrozenLinear, check_precision, worth_lower_precision


def select_lstm(state: LSTMState, index: Tensor) -> LSTMState:
    """Rows `index` (R,) of an LSTM state (h, c), each (L, B, H)."""
    return state[0].index_select(1, index), state[1].index_select(1, index)


def join_lstm(a: LSTMState, b: LSTMState) -> LSTMState:
    """Two LSTM states' rows stacked: a recurrent state is the same size at every position."""
    return torch.cat([a[0], b[0]], 1), torch.cat([a[1], b[1]], 1)


class LSTMStepper:
    """A trained LSTM language model laid out for generation, one token per call.

    nn.LSTM's per-call set-up costs more than a one-token step itself, so each layer here is one
    `torch.lstm_cell` call (in fp32), or, where its weights are held in lower precision (see
    `scriven.precision`), one matmul for all four gates (input and hidden matrices side by side,
    gates reordered input, forget, output | cell so one sigmoid and one tanh cover them). Lower
    precision applies to the output layer and to the layers large enough to gain from it
    (`precision.worth_lower_precision`); smaller ones stay fp32. With fp32 the numbers are the
    model's own, up to summation order.

    In int8, a step runs through the native kernels where this CPU has them (`scriven.accel`:
    AVX-512 VNNI, or their AVX2 build): the whole step is one call, and each layer and the head
    rounds its input to 8 bits, so all dot products are byte products (on the AMX tile units for
    batches, where there are some)."""

    def __init__(self, model: LSTMLanguageModel, precision: str = "fp32") -> None:
        self.model = model
        self.config = model.config
        check_precision(precision)
        self.native = accel.lstm_int8_step(model) if precision == "int8" else None
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
            small = not worth_lower_precision(w_ih.numel() + w_hh.numel(), precision)
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

    select = staticmethod(select_lstm)
    join = staticmethod(join_lstm)


GPTState = tuple[GPTCache, Tensor]  # the key/value cache, and the ids it holds (B, P)


class GPTStepper:
    """A GPT stepped like an `LSTMStepper`: its state is the key/value cache and the text in it.

    It reads at most `context` tokens at once (its trained window; default its max_len): when
    the cache is full, the newest half of the text is read again into a fresh cache. That costs
    one prompt-sized step every context/2 tokens."""

    def __init__(self, model: GPT, context: int | None = None) -> None:
        self.model = model
        self.config = model.config
        self.context = min(context or model.config.max_len, model.config.max_len)

    def read(self, ids: Tensor, state: GPTState | None = None) -> tuple[Tensor, GPTState]:
        """Read a prompt (B, T) into a fresh cache -> logits for the token after it (B, V)."""
        history = ids[:, -self.context:]
        logits, cache = self.model(history)                         # (B, T, V)
        return logits[:, -1].float(), (cache, history)

    def step(self, ids: Tensor, state: GPTState) -> tuple[Tensor, GPTState]:
        """Feed one token per row, ids (B,) -> logits for the next one (B, V), and the state."""
        cache, history = state
        history = torch.cat([history, ids[:, None]], dim=1)         # (B, P + 1)
        if cache.length >= self.context:
            return self.read(history[:, -(self.context // 2):])
        logits, cache = self.model(ids[:, None], cache)             # (B, 1, V)
        return logits[:, -1].float(), (cache, history)

    @staticmethod
    def select(state: GPTState, index: Tensor) -> GPTState:
        cache, history = state
        layers = [KVCache(layer.key.index_select(0, index), layer.value.index_select(0, index))
                  for layer in cache.layers]
        return GPTCache(layers), history.index_select(0, index)

    @staticmethod
    def join(a: GPTState, b: GPTState) -> GPTState | None:
        """Rows of caches that hold as many positions stack; others cannot."""
        if a[1].size(1) != b[1].size(1):
            return None
        layers = [KVCache(torch.cat([x.key, y.key]), torch.cat([x.value, y.value]))
                  for x, y in zip(a[0].layers, b[0].layers)]
        return GPTCache(layers), torch.cat([a[1], b[1]])


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
