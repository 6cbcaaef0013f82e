"""Language-model training and evaluation: text -> token stream -> contiguous streams with
truncated back-propagation through time, the LSTM's hidden state carried between windows."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from .config import check, check_positive_int, from_dict, to_dict
from .data import read_text, resolve_text_source
from .device import Distributed, resolve_device
from .errors import ScrivenError
from .models import kinds_for
from .models.gpt import GPT, GPT_PRESETS, GPTConfig
from .models.lstm import LSTM_PRESETS, LSTMConfig, LSTMLanguageModel
from .sizing import Choice, choose_size
from .tokenizers import BPETokenizer, CharTokenizer, Tokenizer, WordTokenizer
from .train import (
    CheckpointSpec,
    TrainConfig,
    TrainResult,
    file_sha256,
    fit,
)

Batch = tuple[Tensor, Tensor]  # inputs, targets: (B, T) each

# Text generator families: `scriven train lm --model NAME` (the checkpoint kind is NAME too).
MODELS = {"lstm": (LSTMConfig, LSTMLanguageModel, LSTM_PRESETS),
          "gpt": (GPTConfig, GPT, GPT_PRESETS)}


@dataclass(frozen=True)
class LMTrainConfig(TrainConfig):
    """A text generator's training: `batch_size` parallel streams per process, cut into
    `seq_len`-token windows (truncated back-propagation through time for the LSTM)."""

    per_process: ClassVar[tuple[str, ...]] = ("batch_size",)

    batch_size: int = 32
    seq_len: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.batch_size, "batch_size")
        check_positive_int(self.seq_len, "seq_len")


def chars_per_token(tokenizer: Tokenizer, tokens: list[str]) -> float:
    """Characters of normalised text per token, for converting nats/token to bits/character.
    Word tokens stand for the word plus one separating space; characters stand for themselves."""
    if not tokens:
        return 1.0
    if tokenizer.kind == "char":
        return 1.0
    return sum(len(t.replace("\u2581", " ")) + (1 if tokenizer.kind == "word" else 0)
               for t in tokens) / len(tokens)


class LMTask:
    """Next-token prediction on one long token stream, cut into `batch_size` parallel streams
    per process. Rank r of w reads streams r*B..(r+1)*B of w*B, so w processes at batch B see
    exactly the data one process sees at batch w*B."""

    metric = "perplexity"
    higher_is_better = False
    pure_bf16 = False

    def __init__(self, train_ids: Tensor, valid_ids: Tensor, chars_per_token: float,
                 batch_size: int, seq_len: int, device: torch.device,
                 dist: Distributed | None = None, carries_state: bool = True) -> None:
        self.dist = dist or Distributed()
        self.carries_state = carries_state
        self.device = device
        self.seq_len = seq_len
        self.chars_per_token = chars_per_token
        streams = batch_size * self.dist.world
        length = (train_ids.numel() - 1) // streams
        if length < seq_len + 1:
            raise ScrivenError(
                f"the training text has {train_ids.numel()} tokens, too few for {streams} streams "
                f"of {seq_len}-token windows: use more text or a smaller batch_size/seq_len")
        x = train_ids[: streams * length].view(streams, length)              # (S, N)
        y = train_ids[1: streams * length + 1].view(streams, length)         # (S, N)
        rows = slice(self.dist.rank * batch_size, (self.dist.rank + 1) * batch_size)
        self.x, self.y = x[rows].to(device), y[rows].to(device)             # (B, N)
        self.valid_ids = valid_ids
        if valid_ids.numel() < 2:
            raise ScrivenError("the validation part of the text is too short (under 2 tokens)")
        self.hidden: tuple[Tensor, Tensor] | None = None

    def steps_per_epoch(self) -> int:
        return (self.x.size(1) - self._slack()) // self.seq_len

    def _slack(self) -> int:
        """How far an epoch's windows may be shifted. A fixed-context model reads each epoch
        from a different offset into its streams, so that a text seen many times is not cut at
        the same places every time (the same text, other contexts); a recurrent model's state
        runs along the stream, so its windows stay put."""
        length, T = self.x.size(1), self.seq_len
        return 0 if self.carries_state or length < 2 * T else T - 1

    def window_offset(self, epoch: int) -> int:
        slack = self._slack()
        if not slack or epoch == 0:
            return 0
        g = torch.Generator().manual_seed(epoch)  # the epoch alone decides: resumes and ranks agree
        return int(torch.randint(slack + 1, (1,), generator=g))

    def start_epoch(self, epoch: int) -> None:
        self.hidden = None  # the streams start over at the top of the text

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        T, offset = self.seq_len, self.window_offset(epoch)
        for i in range(start, self.steps_per_epoch()):
            a = offset + i * T
            yield self.x[:, a:a + T], self.y[:, a:a + T]

    def loss(self, model: nn.Module, batch: Batch, label_smoothing: float) -> tuple[Tensor, int]:
        x, y = batch
        logits, hidden = model(x, self.hidden)                               # (B, T, V)
        if self.carries_state:  # truncated BPTT: the state flows on, its gradient does not
            self.hidden = (hidden[0].detach().float(), hidden[1].detach().float())
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), label_smoothing=label_smoothing)
        return loss, y.numel()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        nll, count = stream_nll(model, self.valid_ids, self.device, self.dist, self.seq_len)
        return lm_metrics(nll, count, self.chars_per_token)

    def state(self) -> dict[str, Tensor]:
        """The carried state of all streams of all ranks, (L, world*B, H), so a run can resume
        on any number of processes."""
        if self.hidden is None:
            return {}
        h, c = self.hidden
        if self.dist.world > 1:
            h, c = (_gather_streams(t, self.dist.world) for t in (h, c))
        return {"hidden.h": h, "hidden.c": c}

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        self.hidden = None
        if "hidden.h" not in tensors:
            return
        b = self.x.size(0)
        if tensors["hidden.h"].size(1) != b * self.dist.world:
            warnings.warn("resuming with a different total batch size: the streams are cut "
                          "differently, so the carried LSTM state starts afresh", stacklevel=2)
            return
        rows = slice(self.dist.rank * b, (self.dist.rank + 1) * b)
        self.hidden = (tensors["hidden.h"][:, rows].contiguous(), tensors["hidden.c"][:, rows].contiguous())


def _gather_streams(t: Tensor, world: int) -> Tensor:
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=1)


def stream_nll(model: nn.Module, ids: Tensor, device: torch.device, dist: Distributed | None = None,
               window: int = 256) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) of `ids` read left to right as one stream.

    A recurrent model carries its state between windows, so every token sees all of its past. A
    Transformer has a fixed context: windows overlap by half and only each window's second half
    is scored, so every token but the first few sees at least `window / 2` tokens of context.
    Across ranks each process scores one contiguous slice and the sums are reduced."""
    dist = dist or Distributed()
    recurrent = getattr(model, "carries_state", True)
    if not recurrent:
        window = min(window, model.config.max_len)
    n = ids.numel() - 1
    lo, hi = n * dist.rank // dist.world, n * (dist.rank + 1) // dist.world
    total, count, hidden = 0.0, 0, None
    with torch.no_grad():
        if recurrent:
            for i in range(lo, hi, window):
                j = min(i + window, hi)
                logits, hidden = model(ids[i:j].to(device)[None], hidden)      # (1, T, V)
                total += F.cross_entropy(logits.float()[0], ids[i + 1:j + 1].to(device),
                                         reduction="sum").item()
                count += j - i
        else:
            total, count = _windowed_nll(model, ids, device, lo, hi, window)
    if dist.world > 1:
        sums = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums)
        total, count = sums[0].item(), int(sums[1].item())
    return total, count


def _windowed_nll(model: nn.Module, ids: Tensor, device: torch.device, lo: int, hi: int,
                  window: int) -> tuple[float, int]:
    """stream_nll for a fixed-context model over ids[lo:hi + 1]. The windows do not depend on
    each other, so windows of equal length run as one batch (a batch of one per window is
    several times slower, and validation is not counted in a --minutes budget)."""
    spans = []  # (start, first scored, end)
    scored = lo  # positions before this one already have a score
    while scored < hi:
        start = max(lo, scored - window // 2)  # re-read up to window/2 scored tokens
        end = min(start + window, hi)
        spans.append((start, scored, end))
        scored = end
    # Rows per batch: logits of at most 2^25 floats (128 MiB).
    rows = max(1, min(256, 2**25 // (window * model.config.vocab_size)))
    total = 0.0
    i = 0
    while i < len(spans):
        length = spans[i][2] - spans[i][0]
        group = [spans[i]]
        while i + len(group) < len(spans) and len(group) < rows and \
                spans[i + len(group)][2] - spans[i + len(group)][0] == length:
            group.append(spans[i + len(group)])
        x = torch.stack([ids[a:c] for a, _, c in group]).to(device)                # (R, T)
        y = torch.stack([ids[a + 1:c + 1] for a, _, c in group]).to(device)        # (R, T)
        logits, _ = model(x)                                                        # (R, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        keep = torch.arange(length, device=device)[None] >= torch.tensor(
            [b - a for a, b, _ in group], device=device)[:, None]                   # (R, T)
        total += nll.view(len(group), length)[keep].sum().item()
        i += len(group)
    return total, hi - lo


def lm_metrics(nll: float, count: int, chars_per_token: float) -> dict[str, float]:
    mean = nll / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)),
            "bits_per_char": mean / math.log(2) / chars_per_token, "tokens": float(count)}


@dataclass(frozen=True)
class TokenizerConfig:
    kind: str = "word"          # word | char | bpe
    lowercase: bool = True      # word only (the book lowercases)
    min_count: int = 1          # word only: rarer words become <unk>
    max_size: int | None = None # word only: keep the most frequent words
    vocab_size: int = 8000      # bpe only

    def __post_init__(self) -> None:
        check(self.kind in ("word", "char", "bpe"), "tokenizer",
              f"must be word, char or bpe, got {self.kind!r}")


def build_tokenizer(config: TokenizerConfig, text: str) -> Tokenizer:
    if config.kind == "word":
        return WordTokenizer.train([text], lowercase=config.lowercase, min_count=config.min_count,
                                   max_size=config.max_size)
    if config.kind == "char":
        return CharTokenizer.train([text])
    return BPETokenizer.train([text], vocab_size=config.vocab_size)


def _cut_text(text: str, valid_fraction: float, test_fraction: float) -> tuple[str, str, str]:
    """Split the text by position at line boundaries: train first, then valid, then test."""
    n = len(text)
    a = text.rfind("\n", 0, int(n * (1 - valid_fraction - test_fraction))) + 1
    b = text.rfind("\n", 0, int(n * (1 - test_fraction))) + 1
    if not 0 < a < b < n:
        a, b = int(n * (1 - valid_fraction - test_fraction)), int(n * (1 - test_fraction))
    return text[:a], text[a:b], text[b:]


# Measured per family against AdamW in the same run (docs/benchmarks.md, "Muon").
DEFAULT_OPTIMIZER = {"gpt": "muon", "lstm": "adamw"}
# The GPT's `default` preset (and so `auto`) uses ALiBi, which learnt words faster than a
# learned table; on characters the learned table ended lower at 10 minutes (docs/benchmarks.md,
# "Positions by tokenizer"). A preset that names its own scheme keeps it.
CHARACTER_POSITIONS = "learned"


def gpt_positions(preset: str, tokenizer: str, positions: str | None) -> str | None:
    """The position scheme a GPT trains with: `positions` if given, else the preset's, except
    that `default` and `auto` use CHARACTER_POSITIONS on characters. None: the preset's own."""
    if positions is not None:
        return positions
    return CHARACTER_POSITIONS if preset in ("default", "auto") and tokenizer == "char" else None


def default_preset(minutes: float | None, epochs: int | None, max_steps: int | None) -> str:
    """A model trained for a time budget alone is sized for it (`auto`): measured against
    nanoGPT's CPU recipe given the same minutes, on characters, the fixed default GPT ends well
    above it in bits per character and auto below it, and the LSTM's auto ends lower than its
    fixed default (docs/benchmarks.md, "Budget"); on words auto keeps the LSTM's default size."""
    timed_only = minutes is not None and epochs is None and max_steps is None
    alone = Distributed.from_env().world == 1  # see train_lm: auto is not for torchrun
    return "auto" if timed_only and alone else "default"


def train_lm(text: str, out: str | Path, preset: str | None = None, model: str = "lstm",
             tokenizer: str = "word", min_count: int = 1, vocab_size: int = 8000,
             epochs: int | None = None, minutes: float | None = None, max_steps: int | None = None,
             batch_size: int | None = None, seq_len: int | None = None, lr: float | None = None,
             dropout: float | None = None, positions: str | None = None,
             warmup_steps: int | None = None,
             warmup_fraction: float = 0.05, schedule: str = "cosine",
             eval_every: int | None = None,
             evals_per_run: int = 10, patience: int = 0,
             amp: str = "auto", device: str = "auto", seed: int = 0, resume: bool = False,
             log_every: int = 20, compile: bool = False, optimizer: str | None = None,
             progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train a next-token text generator on a text file or a dataset name (e.g. "anna").

    Writes `out/latest` (with training state), `out/best` (lowest validation perplexity),
    `out/metrics.jsonl` (the CLI draws it as `out/loss.png`). `resume=True` continues `out/latest` exactly (same
    settings and text, or an error); a folder that holds a run is kept unless `overwrite`.
    Warmup is `warmup_fraction` of the planned steps (or `warmup_steps`), and there are
    `evals_per_run` validations (or one every `eval_every` steps); see `scriven.train.Plan`.
    `preset="auto"` (with `minutes`) times candidate sizes on this machine and trains the largest
    the budget holds enough text for (see `scriven.sizing`); `batch_size`, `seq_len`, `lr` and
    `dropout` then default to the chosen size's, otherwise to 32, 64, 3e-3 and the preset's, and
    `amp="auto"` trains in the precision that size was timed fastest in.
    Without a preset, see `default_preset`. `optimizer` (adamw or muon, see
    `scriven.optimizers`) defaults to `DEFAULT_OPTIMIZER[model]`, and on resume to the run's.
    `positions` (a GPT's: learned, sinusoidal or alibi) defaults to `gpt_positions`'."""
    check(model in MODELS, "model", f"must be one of {', '.join(MODELS)}, got {model!r}")
    check(positions is None or model == "gpt", "positions",
          f"only a GPT has a position scheme, not a {model}")
    check(positions is None or not resume, "positions", "a resumed run keeps its own")
    config_cls, model_cls, presets = MODELS[model]
    if epochs is None and minutes is None and max_steps is None:
        minutes = 10.0
    if preset is None:
        preset = default_preset(minutes, epochs, max_steps)
    check(preset in presets or preset == "auto", "preset",
          f"must be auto or one of {', '.join(presets)}, got {preset!r}")
    check(preset != "auto" or minutes is not None, "preset",
          "auto sizes the model for a time budget: give --minutes")
    # Each process would time the candidates itself and could choose another size.
    check(preset != "auto" or Distributed.from_env().world == 1, "preset",
          "auto times this machine and cannot run under torchrun: name a preset")
    tok_config = TokenizerConfig(kind=tokenizer, min_count=min_count, vocab_size=vocab_size)
    source = resolve_text_source(text)
    train_text, valid_text, _ = _cut_text(read_text(source), 0.05, 0.05)
    if resume:  # the run's own tokenizer and model config, so the data encodes as before
        saved = ckpt_io.load(Path(out) / "latest")
        tok = ckpt_io.tokenizer_of(saved)
        if saved.kind != model:
            raise ScrivenError(f"--resume: {out} holds a {saved.kind} run, not {model}")
        model_config = from_dict(config_cls, saved.config["model"], "checkpoint model config")
        shape = saved.config.get("train") or {}  # the run's own shape unless stated again
        batch_size = shape.get("batch_size") if batch_size is None else batch_size
        seq_len = shape.get("seq_len") if seq_len is None else seq_len
        lr = lr if lr is not None else shape.get("lr")
        optimizer = optimizer or shape.get("optimizer", "adamw")
        amp = shape.get("amp", amp) if amp == "auto" else amp  # auto's measured choice
        sizing = saved.config.get("sizing")  # what chose this size, kept across resumes
    else:
        tok = build_tokenizer(tok_config, train_text)
        sizing = None
        model_config = config_cls.preset("default" if preset == "auto" else preset, tok.vocab_size)
        if dropout is not None:
            model_config = replace(model_config, dropout=dropout)
        scheme = gpt_positions(preset, tokenizer, positions) if model == "gpt" else None
        if scheme is not None:
            model_config = replace(model_config, positions=scheme)
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    valid_ids = torch.tensor(tok.encode(valid_text), dtype=torch.long)
    cpt = chars_per_token(tok, tok.tokenize(valid_text))
    dist = Distributed.from_env()
    dev = resolve_device(device, dist)
    optimizer = optimizer or DEFAULT_OPTIMIZER[model]
    choice = None
    if preset == "auto" and not resume:
        choice = _choose_size(model, model_config, minutes, train_ids, valid_ids, cpt, dev, dist,
                              amp, optimizer, dropout,
                              carries_state=model_cls.carries_state)
        if progress and dist.main:
            print(choice.describe(), file=sys.stderr)
        model_config = choice.model_config
        batch_size = choice.batch_size if batch_size is None else batch_size
        seq_len = choice.seq_len if seq_len is None else seq_len
        lr = lr if lr is not None else choice.lr
        amp = choice.amp if amp == "auto" else amp
        sizing = choice.record()
    batch_size = 32 if batch_size is None else batch_size
    seq_len = 64 if seq_len is None else seq_len
    train_config = LMTrainConfig(epochs=epochs, minutes=minutes, max_steps=max_steps,
                                 batch_size=batch_size, seq_len=seq_len,
                                 lr=lr if lr is not None else 3e-3, warmup_steps=warmup_steps,
                                 warmup_fraction=warmup_fraction, schedule=schedule,
                                 eval_every=eval_every,
                                 evals_per_run=evals_per_run,
                                 patience=patience, amp=amp, device=device, seed=seed,
                                 log_every=log_every, compile=compile, optimizer=optimizer)
    if config_cls is GPTConfig and resume:
        check(seq_len <= model_config.max_len, "seq_len",
              f"must be at most the run's trained context {model_config.max_len}, got {seq_len}")
    elif config_cls is GPTConfig:
        # A GPT's context is the window it trains on: positions past `seq_len` would never be
        # trained, yet evaluation and generation would read them. So the model is built with
        # max_len = seq_len (whatever the preset or `auto` said), and the checkpoint's max_len
        # says how far it may read.
        model_config = replace(model_config, max_len=seq_len)
    torch.manual_seed(seed)
    net = model_cls(model_config)
    task = LMTask(train_ids, valid_ids, cpt, batch_size, seq_len, dev, dist, net.carries_state)
    spec = CheckpointSpec(model, to_dict(model_config), tok.to_json_str(),
                          {"source": str(text), "split": "position 90/5/5 (train, valid, test)",
                           "tokenizer": to_dict(tok_config), "sha256": file_sha256(source)},
                          sizing=sizing)
    return fit(net, task, train_config, out, spec, resume=resume, progress_bar=progress,
               overwrite=overwrite, spent=choice.seconds if choice else 0.0)


def _choose_size(family: str, base: Any, minutes: float, train_ids: Tensor, valid_ids: Tensor,
                 cpt: float, device: torch.device, dist: Distributed, amp: str, optimizer: str,
                 dropout: float | None, carries_state: bool) -> Choice:
    """`--preset auto` for a text generator: time each candidate on this text's batches."""
    model_cls = MODELS[family][1]

    def batches(batch_size: int, seq_len: int) -> Iterator[Batch]:
        task = LMTask(train_ids, valid_ids, cpt, batch_size, seq_len, device, dist, carries_state)
        return task.batches(0, 0)

    def loss(model: nn.Module, batch: Batch) -> tuple[Tensor, int]:
        x, y = batch
        logits, _ = model(x, None)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten()), y.numel()

    return choose_size(family, base, minutes, train_ids.numel(), model_cls, batches, loss,
                       device, amp, optimizer, cpt, dropout)


def evaluate_lm(checkpoint: str | Path, text: str, device: str = "auto") -> dict[str, float]:
    """Perplexity and bits per character of a checkpoint on any text (a file or dataset name).
    A GPT is scored with windows of its trained context (see `checkpoint.trained_context`)."""
    dev = resolve_device(device)
    model, tok, ckpt = ckpt_io.load_model(checkpoint, dev, kinds=kinds_for("lm"))
    window = 256 if model.carries_state else ckpt_io.trained_context(ckpt.config)
    content = read_text(resolve_text_source(text))
    ids = torch.tensor(tok.encode(content), dtype=torch.long)
    if ids.numel() < 2:
        raise ScrivenError(f"text {text}: needs at least 2 tokens to score")
    tokens = tok.tokenize(content)
    nll, count = stream_nll(model, ids, dev, window=window)
    return lm_metrics(nll, count, chars_per_token(tok, tokens))
