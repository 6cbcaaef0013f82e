"""`--preset auto`: the model size chosen for the budget and the machine.

A fixed preset wastes a short budget on a slow machine (a large model that sees too few tokens)
and a long budget on a fast one (a small model that stops improving). `choose_size` times a few
training steps of each candidate on this machine, turns the speed into the text the budget
holds, and takes the largest candidate that still sees `RULES[family]` of it per parameter
(embeddings not counted: at these sizes a word vocabulary's table would dominate the count
without costing matmul time per token). An LSTM's rule counts characters of text: on words (a
word is about 4.6 characters) the LSTM's default size, 2 x 256, which sees 1.3 tokens per
parameter in 10 minutes, ended at perplexity 87.6 where the size a token rule chose (2 x 128,
9 tokens per parameter) ended at 101.4. A GPT's rule counts characters too: on words at 15
minutes it chooses a 4 x 128 (18 characters per parameter), which with ALiBi and dropout 0.1
ended at perplexity 72 where the 2 x 128 a token rule chose ended at 82 (best 78); the same 4 x
128 with a learned position table and no dropout had overfit, from 81 to 126 (docs/benchmarks.md,
"A GPT with ALiBi"). On characters the two rules are one.

Where the ratios come from: character-level models on Anna Karenina on 2 cores
(docs/benchmarks.md, "Budget"). Given 3 minutes, a 2-layer GPT that saw about 17 tokens per
parameter ended lower in bits per character than 4-layer and wider ones that saw 3 to 5; given
10, a 3-layer GPT that saw 16 ended lower than the 2-layer one at 35. The GPT's rule, 10, lies
between the 5 that lost and the 16 that won; each rung up the ladder costs about 1.5x the tokens
per parameter, so the chosen size sees 10 to 15 or more, below the 20 that Hoffmann et al.
(2022) fit for much larger Transformers. LSTMs paid off at less text per parameter: 7 beat 60.
`bench/budget.py` measures the rules against the fixed presets and against peers' recipes.

Each candidate is timed in the precision it trains fastest in: under `amp="auto"` on a CPU with
fast bf16 matmuls (AMX), both bf16 autocast and fp32, since which wins depends on the size
(natively a 3 x 128 GPT ran its steps about a fifth faster in fp32, where the casts cost more than
its small matmuls save, and a 2 x 256 LSTM twice as fast in bf16); the run then trains in it.

Dropout follows the epochs the budget holds: a model that sees each token about once does not
overfit, and dropout only slows it; repeated passes over a small text need it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from . import accel
from .device import autocast_dtype, training_precision
from .optimizers import make_optimizer

# (text per parameter the chosen size must see, counted in): see above.
RULES = {"gpt": (10.0, "characters"), "lstm": (5.0, "characters")}
WARMUP_STEPS = 2         # per candidate: allocations, kernel choices, first-touch pages
MAX_TIMED_STEPS = 30     # then up to these, the fastest counting
MAX_TIMING_SECONDS = 2.0  # per candidate: a large model on a slow machine stops early ...
BUDGET_SHARE = 0.01       # ... and so does any candidate past 1% of the budget
# The share of a --minutes run that goes at its fastest steps' pace: validations, checkpoints,
# the data pipeline and the machine's slower moments take the rest (docs/benchmarks.md, "auto's
# timing").
RUN_EFFICIENCY = 0.8

# Candidates, smallest first. Each names a model size and the training shape that suits it:
# small models learn best from many small steps; wider ones from larger batches, a longer
# context and a lower learning rate (the settings of the published recipes at these widths).
GPT_LADDER: list[dict[str, Any]] = [
    dict(name="gpt-2x128", model=dict(d_model=128, n_heads=4, n_layers=2, d_ff=512),
         batch_size=32, seq_len=64, lr=3e-3),
    dict(name="gpt-3x128", model=dict(d_model=128, n_heads=4, n_layers=3, d_ff=512),
         batch_size=32, seq_len=64, lr=3e-3),
    dict(name="gpt-4x128", model=dict(d_model=128, n_heads=4, n_layers=4, d_ff=512),
         batch_size=32, seq_len=64, lr=2e-3),
    dict(name="gpt-4x192", model=dict(d_model=192, n_heads=4, n_layers=4, d_ff=768),
         batch_size=32, seq_len=64, lr=2e-3),
    dict(name="gpt-4x256", model=dict(d_model=256, n_heads=4, n_layers=4, d_ff=1024),
         batch_size=32, seq_len=128, lr=1e-3),
    dict(name="gpt-6x384", model=dict(d_model=384, n_heads=6, n_layers=6, d_ff=1536),
         batch_size=32, seq_len=128, lr=6e-4),
    dict(name="gpt-8x512", model=dict(d_model=512, n_heads=8, n_layers=8, d_ff=2048),
         batch_size=32, seq_len=256, lr=5e-4),
]
LSTM_LADDER: list[dict[str, Any]] = [
    dict(name="lstm-2x128", model=dict(embed_dim=128, hidden_dim=128, num_layers=2,
                                       tie_embeddings=True), batch_size=32, seq_len=64, lr=3e-3),
    dict(name="lstm-2x256", model=dict(embed_dim=256, hidden_dim=256, num_layers=2,
                                       tie_embeddings=True), batch_size=32, seq_len=64, lr=3e-3),
    dict(name="lstm-2x384", model=dict(embed_dim=384, hidden_dim=384, num_layers=2,
                                       tie_embeddings=True), batch_size=32, seq_len=64, lr=3e-3),
    dict(name="lstm-2x512", model=dict(embed_dim=512, hidden_dim=512, num_layers=2,
                                       tie_embeddings=True), batch_size=32, seq_len=64, lr=2e-3),
]
LADDERS = {"gpt": GPT_LADDER, "lstm": LSTM_LADDER}
# A GPT's window holds at least this much text, in characters (an LSTM carries its state along
# the text and has no window). On characters a 3 x 128 GPT given 10 minutes ended at 1.610 bits
# per character with windows of 128 (batch 16) where windows of 64 (batch 32) ended at 1.628; on
# words, 64-word windows (about 300 characters) did better than 256 (docs/benchmarks.md, "A
# GPT's window").
MIN_CONTEXT_CHARACTERS = 128
# (epochs the budget holds up to, dropout): the GPT's from nanoGPT's recipes (0 for its 1.5-epoch
# CPU run, 0.2 for its 80-epoch GPU run) and from the 3-minute runs above (a 2 x 128 GPT at 4
# epochs did worse with dropout 0.1 than without); the LSTM's from scriven's presets (0.3 at
# about 10 epochs of word-level text); the translator's from eng-fra runs of the default preset
# (at 2 epochs dropout 0.1 cost several BLEU; the 60-minute runs of many epochs use 0.1, the
# paper's rate).
# A GPT overfits a text that is small for it well before the passes above call for dropout: on
# Anna Karenina's words (0.43 M training tokens) a 2 x 128 GPT (0.40 M parameters) without it
# rose from perplexity 83 to 109 over its third to sixth pass, where with 0.1 it reached 81 and
# ended at 82 (0.2 did worse); on characters (1.8 M tokens, 3 or more per parameter) GPTs
# improved to the end without it. Not enough: timed into 13 passes, the same GPT with 0.1 rose
# from 83 to 90 (docs/benchmarks.md, "A GPT reads each pass over the text at another offset").
# family: (training tokens per parameter below which the text is small, the least dropout then)
SMALL_TEXT = {"gpt": (2.0, 0.1)}
DROPOUT_BY_EPOCHS = {"gpt": ((8.0, 0.0), (32.0, 0.1), (float("inf"), 0.2)),
                     "lstm": ((2.0, 0.0), (8.0, 0.2), (float("inf"), 0.3)),
                     "translator": ((4.0, 0.0), (float("inf"), 0.1))}


@dataclass(frozen=True)
class Candidate:
    name: str
    parameters: int          # without embeddings
    tokens_per_s: float
    budget_tokens: float
    text_per_token: float = 1.0   # in the rule's unit: characters per token, or 1
    amp: str = "auto"             # the precision it was timed fastest in (see `precisions_to_time`)
    dropout: float = 0.0          # timed with

    @property
    def text_per_parameter(self) -> float:
        return self.budget_tokens * self.text_per_token / max(self.parameters, 1)


@dataclass(frozen=True)
class Choice:
    """What `auto` chose: the model config, its training shape, and the measurements behind it."""

    name: str
    model_config: Any
    batch_size: int
    seq_len: int
    lr: float
    dropout: float
    candidates: tuple[Candidate, ...]
    ratio: float             # the rule: text per parameter the chosen size must see ...
    seconds: float           # spent timing, taken from the budget
    optimizer: str = "adamw"  # what the candidates were timed with (and the run trains with)
    unit: str = "tokens"      # ... counted in tokens or characters
    amp: str = "auto"         # the chosen candidate's precision: what the run trains in

    def describe(self) -> str:
        lines = [f"preset auto: {self.name} (batch {self.batch_size} x {self.seq_len} tokens, "
                 f"lr {self.lr:g}, dropout {self.dropout:g}, {self.optimizer}"
                 f"{_precision_label(self.amp, ', ')}); timed in {self.seconds:.1f} s:"]
        for c in self.candidates:
            mark = "*" if c.name == self.name else " "
            lines.append(f" {mark} {c.name}: {c.parameters / 1e6:.2f} M parameters, "
                         f"{c.tokens_per_s:,.0f} tokens/s{_precision_label(c.amp, ' in ')}"
                         + (f" with dropout {c.dropout:g}" if c.dropout else "")
                         + f" -> {c.budget_tokens / 1e6:.2f} M tokens"
                         + (f" ({c.budget_tokens * c.text_per_token / 1e6:.2f} M characters)"
                            if self.unit == "characters" else "")
                         + f" = {c.text_per_parameter:.1f} {self.unit} per parameter")
        lines.append(f"   rule: the largest with >= {self.ratio:g} {self.unit} per parameter")
        return "\n".join(lines)

    def record(self) -> dict[str, Any]:
        """For the checkpoint: what was chosen and the speeds that chose it."""
        return {"chose": self.name, "optimizer": self.optimizer, "amp": self.amp,
                "rule": {"per_parameter": self.ratio, "unit": self.unit},
                "timing_seconds": round(self.seconds, 2),
                "candidates": [{"name": c.name, "parameters": c.parameters,
                                "tokens_per_s": round(c.tokens_per_s), "amp": c.amp,
                                "dropout": c.dropout,
                                "budget_tokens": round(c.budget_tokens),
                                f"{self.unit}_per_parameter": round(c.text_per_parameter, 2)}
                               for c in self.candidates]}


def _precision_label(amp: str, lead: str) -> str:
    # "auto" was not compared: the run's own precision, said elsewhere.
    return "" if amp == "auto" else lead + {"off": "fp32"}.get(amp, amp)


def precisions_to_time(amp: str, device: torch.device) -> tuple[str, ...]:
    """The training precisions (`--amp` modes) each candidate is timed in: bf16 autocast and
    fp32 where `auto` would train in bf16 on a CPU (see the module's docstring), else the run's
    own."""
    if amp == "auto" and device.type == "cpu" and autocast_dtype(amp, device) is torch.bfloat16:
        return ("bf16", "off")
    return (amp,)


def parameters_without_embeddings(model: nn.Module) -> int:
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def time_training(model: nn.Module, batches, loss_fn: Callable, device: torch.device,
                  amp: str, lr: float, seconds: float = MAX_TIMING_SECONDS,
                  optimizer: str = "adamw") -> float:
    """Tokens/s of training steps as `fit` takes them (accelerated, in the run's precision, with
    its optimizer): WARMUP_STEPS steps, then up to MAX_TIMED_STEPS, stopping early past
    `seconds`. The fastest step counts: other processes, and the slower spells a shared
    machine goes through for seconds at a time, only ever add time, and a median of a few steps
    taken in such a spell misjudged a candidate's speed by a quarter."""
    model.to(device).train()
    accel.apply(model, device, "train")
    dtype = autocast_dtype(training_precision(amp, device, False), device)
    opt = make_optimizer(model, optimizer, lr, 0.0, (0.9, 0.99), 1e-8, dtype)
    rates: list[float] = []
    began = time.perf_counter()
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, n = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_STEPS:
            rates.append(n / max(time.perf_counter() - start, 1e-9))
        if len(rates) >= MAX_TIMED_STEPS or (rates and time.perf_counter() - began > seconds):
            break
    return max(rates, default=0.0)


def budget_tokens(tokens_per_s: float, seconds: float) -> float:
    """The tokens a run of `seconds` trains on, from the fastest timed steps' speed."""
    return tokens_per_s * seconds * RUN_EFFICIENCY


def pick(candidates: list[Candidate], ratio: float) -> int:
    """Index of the largest candidate that sees `ratio` text per parameter or more (the
    smallest if none does)."""
    fitting = [i for i, c in enumerate(candidates) if c.text_per_parameter >= ratio]
    return fitting[-1] if fitting else 0


def dropout_for(family: str, epochs: float, text_per_parameter: float = float("inf")) -> float:
    """Dropout for `epochs` passes over a training text of `text_per_parameter` tokens per
    (non-embedding) parameter: on a text that is small for it (`SMALL_TEXT`), a model that
    sees the text more than once keeps some dropout."""
    dropout = next(p for limit, p in DROPOUT_BY_EPOCHS[family] if epochs <= limit)
    small, least = SMALL_TEXT.get(family, (0.0, 0.0))
    return max(dropout, least) if epochs > 1 and text_per_parameter < small else dropout


def choose_size(family: str, base_config: Any, minutes: float, train_tokens: int,
                make_model: Callable[[Any], nn.Module],
                make_batches: Callable[[int, int], Any], loss_fn: Callable,
                device: torch.device, amp: str, optimizer: str = "adamw",
                chars_per_token: float = 1.0, dropout: float | None = None) -> Choice:
    """Time each candidate of `family`'s ladder and choose one for `minutes` of training.

    `base_config` is the model config to resize (its vocabulary and other fields are kept);
    `make_batches(batch_size, seq_len)` yields training batches; `train_tokens` is the size of
    the training text in tokens, for the epochs the budget holds; `chars_per_token` is the
    tokenizer's, for a rule that counts characters; `dropout`, the user's, else `dropout_for`'s.

    A candidate is timed with the dropout it trains with, since dropout costs time (more in
    some precisions than others): each without dropout (or with the user's) until one cannot fit,
    then the largest that fits again with the dropout its epochs call for, where that is not
    none; if it then no longer fits, the next smaller one likewise."""
    start = time.perf_counter()
    seconds = min(MAX_TIMING_SECONDS, BUDGET_SHARE * minutes * 60)
    ratio, unit = RULES[family]
    text_per_token = chars_per_token if unit == "characters" else 1.0
    ladder = [shaped(family, rung, chars_per_token) for rung in LADDERS[family]]
    precisions = precisions_to_time(amp, device)

    def timed(i: int, p: float) -> Candidate:
        rung = ladder[i]
        config = replace(base_config, **rung["model"], **_context(family, rung), dropout=p)
        speed, precision, parameters = _fastest(config, rung, make_model, make_batches, loss_fn,
                                                device, precisions, seconds / len(precisions),
                                                optimizer)
        return Candidate(rung["name"], parameters, speed, budget_tokens(speed, minutes * 60),
                         text_per_token, precision, p)

    measured: list[Candidate] = []
    for i in range(len(ladder)):
        measured.append(timed(i, 0.0 if dropout is None else dropout))
        if measured[-1].text_per_parameter < ratio:
            break  # larger candidates are slower still: none of them can fit
    best = pick(measured, ratio)
    while dropout is None:
        c = measured[best]
        p = dropout_for(family, c.budget_tokens / max(train_tokens, 1),
                        train_tokens / max(c.parameters, 1))
        if p == 0:
            break
        measured[best] = timed(best, p)
        if best == 0 or measured[best].text_per_parameter >= ratio:
            break
        best -= 1
    rung, chosen = ladder[best], measured[best]
    config = replace(base_config, **rung["model"], **_context(family, rung),
                     dropout=chosen.dropout)
    return Choice(rung["name"], config, rung["batch_size"], rung["seq_len"], rung["lr"],
                  chosen.dropout, tuple(measured), ratio, time.perf_counter() - start, optimizer,
                  unit, chosen.amp)


def shaped(family: str, rung: dict[str, Any], chars_per_token: float) -> dict[str, Any]:
    """`rung` with a GPT's window doubled until it holds `MIN_CONTEXT_CHARACTERS` of text, and
    its batch cut to keep the tokens of a step."""
    window = rung["seq_len"]
    while family == "gpt" and window * chars_per_token < MIN_CONTEXT_CHARACTERS:
        window *= 2
    return {**rung, "seq_len": window,
            "batch_size": max(1, rung["batch_size"] * rung["seq_len"] // window)}


def _fastest(config: Any, rung: dict[str, Any], make_model: Callable[[Any], nn.Module],
             make_batches: Callable[[int, int], Any], loss_fn: Callable, device: torch.device,
             precisions: tuple[str, ...], seconds: float,
             optimizer: str) -> tuple[float, str, int]:
    """(tokens/s, precision, parameters without embeddings) of `config` in the fastest of
    `precisions`, each timed from the same initial weights."""
    runs = []
    for precision in precisions:
        torch.manual_seed(0)
        model = make_model(config)
        speed = time_training(model, make_batches(rung["batch_size"], rung["seq_len"]), loss_fn,
                              device, precision, rung["lr"], seconds, optimizer)
        runs.append((speed, precision, parameters_without_embeddings(model)))
    return max(runs)


def _context(family: str, rung: dict[str, Any]) -> dict[str, Any]:
    # A GPT reads exactly the context it trains on (see lm.train_lm).
    return {"max_len": rung["seq_len"]} if family == "gpt" else {}
