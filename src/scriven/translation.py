"""English→French translation with the encoder–decoder Transformer: the translator's data,
training (`train_translate`) and evaluation (`evaluate_translation`, BLEU and chrF), as
`lm.py` is the language model's. Translating and reading attention (the inference half) are in
`translator.py`, as generation is in `generation.py`.

Data flow: pair file → `read_pairs` (normalised; malformed lines reported with line numbers) →
`split_pairs` by source sentence (train/valid/test 90/5/5, fixed seed) → one joint BPE tokenizer
learned on the training split, both sides, case and accents kept → ids: source = its pieces,
target = <bos> pieces <eos> → `token_batches` by token count. The decoder reads <bos> + target
and predicts target + <eos> (teacher forcing); one embedding table serves both languages.
"""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checkpoint as ckpt_io
from .config import check, check_positive_int, from_dict, to_dict
from .data import DATASETS, get_dataset, resolve_text_source
from .device import Distributed, resolve_device
from .errors import ScrivenError
from .models.transformer import PRESETS, Transformer, TransformerConfig
from .pairs import (
    Batch,
    Pair,
    encode_texts,
    read_pairs,
    split_pairs,
    token_batches,
)
from .sizing import BUDGET_SHARE, MAX_TIMING_SECONDS, budget_tokens, dropout_for, time_training
from .tokenizers import BOS_ID, EOS_ID, PAD_ID, BPETokenizer, Tokenizer
from .train import (
    CheckpointSpec,
    TrainConfig,
    TrainResult,
    file_sha256,
    fit,
)
from .translator import (
    KIND,
    LoadedTranslator,
    check_search,
    loaded_translator,
    search_ids,
    translation_text,
    warn_cut,
)

# The split is part of the data, not of a run: fixed, so every run (and `evaluate_translation`)
# sees the same test sentences.
SPLIT = {"valid_fraction": 0.05, "test_fraction": 0.05, "seed": 0}
BLEU_SAMPLE_SEED = 0

# Model sizes: the Transformer presets plus a tiny one for tests and smoke runs.
TRANSLATOR_PRESETS: dict[str, dict[str, Any]] = {
    **PRESETS,
    "tiny": {
        "d_model": 32, "n_heads": 2, "d_ff": 64, "encoder_layers": 1, "decoder_layers": 1,
        "dropout": 0.1, "activation": "relu", "norm_first": True, "positions": "sinusoidal",
        "max_len": 64, "share_embeddings": True, "bias": False,
    },
}

# How each preset trains, where the caller does not say: batches of about `max_tokens` padded
# tokens at peak rate `lr`. Within a budget of minutes on a CPU, the default preset learns most
# from many small steps at a high rate (docs/benchmarks.md, "Budget"); the book's post-norm
# model keeps the paper's rate, and the GPU preset the large batches a GPU wants.
RECIPES: dict[str, dict[str, Any]] = {
    "seed": {"max_tokens": 4096, "lr": 1e-3, "optimizer": "adamw"},
    "default": {"max_tokens": 2048, "lr": 2e-3, "optimizer": "adamw"},
    "gpu": {"max_tokens": 4096, "lr": 1e-3, "optimizer": "adamw"},
    "tiny": {"max_tokens": 512, "lr": 3e-3, "optimizer": "adamw"},
}

Example = tuple[list[int], list[int]]  # source ids, <bos> target ids <eos>


def model_config(preset: str, vocab_size: int) -> TransformerConfig:
    """The named preset for one shared vocabulary of `vocab_size` (embeddings tied)."""
    check(preset in TRANSLATOR_PRESETS, "preset",
          f"must be one of {', '.join(TRANSLATOR_PRESETS)}, got {preset!r}")
    values = dict(TRANSLATOR_PRESETS[preset], src_vocab_size=vocab_size,
                  tgt_vocab_size=vocab_size)
    return from_dict(TransformerConfig, values, where=f"preset {preset}")


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class PairData:
    """A pair file read and split: what training and evaluation share."""

    path: Path
    dataset: str | None  # the registered dataset name, when the data came by name
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]
    malformed: int
    too_long: int


def load_pairs(pairs: str | Path, max_words: int | None = None, strict: bool = False) -> PairData:
    """Read a TSV/CSV pair file or a dataset name ("eng-fra") and split it by source sentence.
    Malformed lines and pairs over `max_words` are skipped with one warning naming the first
    line numbers; `strict` makes a malformed line an error."""
    name = str(pairs)
    path = resolve_text_source(name)
    dataset = name if name in DATASETS else None
    items, report = read_pairs(path, strict=strict, max_words=max_words)
    if report.malformed or report.too_long:
        warnings.warn(report.summary(), stacklevel=3)
    s = split_pairs(items, **SPLIT)
    return PairData(path, dataset, s.train, s.valid, s.test, len(report.malformed),
                    len(report.too_long))


def encode_pairs(tok: Tokenizer, pairs: Sequence[Pair], max_len: int, strict: bool = False,
                 what: str = "training") -> tuple[list[Example], list[Pair]]:
    """(source ids, <bos> target <eos>) per pair. Pairs whose source is longer than `max_len`
    tokens, or whose target with <bos> is, cannot be fed to the model: they are dropped with a
    warning naming their lines (an error with `strict`)."""
    sources = encode_texts(tok, [p.source for p in pairs])
    targets = encode_texts(tok, [p.target for p in pairs])
    examples: list[Example] = []
    kept: list[Pair] = []
    dropped: list[int] = []
    for pair, src, tgt in zip(pairs, sources, targets):
        if len(src) > max_len or len(tgt) + 1 > max_len:
            dropped.append(pair.line)
            continue
        examples.append((src, [BOS_ID, *tgt, EOS_ID]))
        kept.append(pair)
    if dropped:
        lines = ", ".join(map(str, sorted(dropped)[:5])) + (" ..." if len(dropped) > 5 else "")
        message = (f"{len(dropped)} {what} pairs are longer than the model's max_len ({max_len} "
                   f"tokens) and were left out (lines {lines})")
        if strict:
            raise ScrivenError(message)
        warnings.warn(message, stacklevel=3)
    return examples, kept


def bleu_subset(n_pairs: int, size: int) -> list[int]:
    """A fixed random sample of `size` indices out of `n_pairs`, in order. Pair files are often
    sorted by length, so the first pairs would be the shortest, not a fair sample."""
    if size >= n_pairs:
        return list(range(n_pairs))
    return sorted(random.Random(BLEU_SAMPLE_SEED).sample(range(n_pairs), size))


def _corpus_scores(hyps: list[str], refs: list[list[str | None]]) -> dict[str, Any]:
    """BLEU (cased, 13a) and chrF with their sacrebleu signatures; `refs` are reference streams
    (several for multi-reference scoring; None where a sentence has fewer)."""
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(), CHRF()
    b = bleu.corpus_score(hyps, refs)
    c = chrf.corpus_score(hyps, refs)
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def _attention_kernel(device: torch.device, model: nn.Module) -> contextlib.AbstractContextManager:
    """The attention kernel for training steps. On a CPU in bf16 (autocast or a bf16 model),
    PyTorch's fused (flash) kernel is several times slower than the plain matmul-softmax-matmul
    path for the short sentences of translation data (measured: 87 ms vs 17 ms forward+backward
    for 300 sentences of 14 tokens), so the plain path is chosen there; elsewhere PyTorch picks."""
    bf16 = ((torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            or next(model.parameters()).dtype == torch.bfloat16)
    if device.type == "cpu" and bf16:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host-to-GPU copies from pinned memory run asynchronously, overlapping compute."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


@dataclass(frozen=True)
class TranslateTrainConfig(TrainConfig):
    """A translator's training: batches of about `max_tokens` padded tokens per process."""

    per_process: ClassVar[tuple[str, ...]] = ("max_tokens",)

    max_tokens: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self.max_tokens, "max_tokens")


class TranslationTask:
    """Teacher-forced, label-smoothed cross-entropy on batches of about `max_tokens` padded
    tokens, reshuffled each epoch from seed + epoch (so any batch can be found again on resume);
    validation = loss over the validation split plus BLEU/chrF of greedy translations of a fixed
    sample of it. Under torchrun rank r takes batches r, r + w, ...; validation is split across
    ranks and reduced, so every rank returns the same numbers."""

    metric = "bleu"
    higher_is_better = True
    pure_bf16 = True

    def __init__(self, train: list[Example], valid: list[Example], bleu_sources: list[list[int]],
                 bleu_references: list[str], tokenizer: Tokenizer, max_tokens: int, seed: int,
                 device: torch.device, dist: Distributed | None = None,
                 decode_batch_size: int = 64) -> None:
        if not train:
            raise ScrivenError("the training split is empty: give more sentence pairs")
        if not valid:
            raise ScrivenError("the validation split is empty (5% of the source sentences): "
                               "give more sentence pairs")
        self.train, self.valid = train, valid
        self.bleu_sources, self.bleu_references = bleu_sources, bleu_references
        self.tokenizer = tokenizer
        self.max_tokens, self.seed = max_tokens, seed
        self.device = device
        self.dist = dist or Distributed()
        self.decode_batch_size = decode_batch_size
        self._epoch: int | None = None
        self._batches: list[Batch] = []
        self._valid_batches = token_batches(valid, max_tokens, PAD_ID, shuffle=False)

    def _epoch_batches(self, epoch: int) -> list[Batch]:
        if self._epoch != epoch:
            self._batches = token_batches(self.train, self.max_tokens, PAD_ID, shuffle=True,
                                          seed=self.seed + epoch)
            self._epoch = epoch
        return self._batches

    def steps_per_epoch(self) -> int:
        # Bucketing makes the batch count vary a little between epochs; epoch 0's count is the
        # same on every run and resume, which is what the schedule needs.
        return len(self._epoch_batches(0)) // self.dist.world

    def start_epoch(self, epoch: int) -> None:
        pass

    def batches(self, epoch: int, start: int) -> Iterator[Batch]:
        batches = self._epoch_batches(epoch)
        w, r = self.dist.world, self.dist.rank
        for i in range(start, len(batches) // w):
            yield batches[i * w + r]

    def loss(self, model: nn.Module, batch: Batch, label_smoothing: float) -> tuple[Tensor, int]:
        src, tgt = _to_device(batch.src, self.device), _to_device(batch.tgt, self.device)  # (B, S), (B, T + 1)
        labels = tgt[:, 1:].flatten()                                       # (B*T,)
        # Only real positions reach the vocabulary projection and the (fp32) softmax, so
        # padding costs nothing there.
        real = (labels != PAD_ID).nonzero().squeeze(1)                      # (N,)
        with _attention_kernel(self.device, model):
            loss = model(src, tgt[:, :-1], real, labels.index_select(0, real), label_smoothing)
        return loss, real.numel()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, Transformer)
        with _attention_kernel(self.device, model):
            return self._evaluate(model)

    def _evaluate(self, model: Transformer) -> dict[str, float]:
        w, r = self.dist.world, self.dist.rank
        total, count = 0.0, 0
        for batch in self._valid_batches[r::w]:
            src, tgt = batch.src.to(self.device), batch.tgt.to(self.device)
            logits = model(src, tgt[:, :-1])                                # (B, T, V)
            total += F.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten(),
                                     ignore_index=PAD_ID, reduction="sum").item()
            count += int((tgt[:, 1:] != PAD_ID).sum())
        mine = list(range(r, len(self.bleu_sources), w))
        found = search_ids(model, [self.bleu_sources[i] for i in mine],
                           batch_size=self.decode_batch_size)
        hyps = {i: translation_text(self.tokenizer, h[0][0]) for i, h in zip(mine, found)}
        if w > 1:
            sums = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(sums)
            total, count = sums[0].item(), int(sums[1].item())
            gathered: list[dict[int, str] | None] = [None] * w
            torch.distributed.all_gather_object(gathered, hyps)
            hyps = {i: t for part in gathered if part for i, t in part.items()}
        mean = total / max(count, 1)
        scores = _corpus_scores([hyps[i] for i in range(len(self.bleu_sources))],
                                [self.bleu_references])
        return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "bleu": scores["bleu"],
                "chrf": scores["chrf"]}

    def state(self) -> dict[str, Tensor]:
        return {}  # batches are a function of (seed, epoch, position), which the trainer keeps

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        pass


def train_translate(pairs: str, out: str | Path, preset: str = "default", vocab_size: int = 8000,
                    max_words: int | None = None, strict: bool = False,
                    epochs: int | None = None, minutes: float | None = None,
                    max_steps: int | None = None, max_tokens: int | None = None,
                    lr: float | None = None,
                    warmup_steps: int | None = None, warmup_fraction: float = 0.05,
                    schedule: str = "cosine",
                    label_smoothing: float = 0.1, dropout: float | None = None,
                    eval_every: int | None = None, evals_per_run: int = 5,
                    patience: int = 0, bleu_sentences: int = 500, amp: str = "auto",
                    device: str = "auto", seed: int = 0, resume: bool = False,
                    log_every: int = 20, compile: bool = False, optimizer: str | None = None,
                    progress: bool = True, overwrite: bool = False) -> TrainResult:
    """Train a translator on a sentence-pair file (TSV or CSV: source, target, extra columns
    ignored) or a dataset name ("eng-fra").

    The pairs are split 90/5/5 by source sentence (every translation of a sentence in the same
    split); a joint BPE tokenizer of `vocab_size` is learned on the training split (both
    languages, case and accents kept). Warmup is `warmup_fraction` of the planned steps (or
    `warmup_steps`; see `scriven.train.Plan`). `evals_per_run` validations (or one every
    `eval_every` steps; fewer than a text generator's, as each decodes sentences): loss, and BLEU/chrF
    of greedy translations of a fixed sample of `bleu_sentences` validation pairs; `best` and
    early stopping (`patience`) follow BLEU. `max_tokens` (padded tokens per batch), `lr` and
    `optimizer` default to the preset's recipe (`RECIPES`; a resumed run's own). `dropout` overrides the
    preset's; left out, a run whose budget holds few passes over the pairs trains without it
    (`budget_dropout`). `max_words` drops pairs with a longer side; pairs longer than the
    model's max_len tokens are always dropped (with a warning). Writes `out/latest`,
    `out/best`, `out/metrics.jsonl` (the CLI draws `out/loss.png`); `resume` continues exactly
    (same settings and pairs, or an error); a folder that holds a run is kept unless `overwrite`.
    """
    check(preset in TRANSLATOR_PRESETS, "preset",
          f"must be one of {', '.join(TRANSLATOR_PRESETS)}, got {preset!r}")
    check_positive_int(bleu_sentences, "bleu_sentences")
    if epochs is None and minutes is None and max_steps is None:
        minutes = 10.0
    recipe = dict(RECIPES[preset])
    saved = _saved(out) if resume else None
    if saved is not None:  # the run's own recipe unless stated again
        before = saved.config.get("train") or {}
        recipe.update((k, v) for k, v in before.items() if k in recipe)
        recipe["optimizer"] = before.get("optimizer", "adamw")  # older runs all used AdamW
    config = TranslateTrainConfig(epochs=epochs, minutes=minutes, max_steps=max_steps,
                                  max_tokens=recipe["max_tokens"] if max_tokens is None
                                  else max_tokens, lr=recipe["lr"] if lr is None else lr,
                                  warmup_steps=warmup_steps, warmup_fraction=warmup_fraction,
                                  schedule=schedule,
                                  betas=(0.9, 0.98), label_smoothing=label_smoothing,
                                  eval_every=eval_every, evals_per_run=evals_per_run,
                                  patience=patience, amp=amp, device=device, seed=seed,
                                  log_every=log_every, compile=compile,
                                  optimizer=recipe["optimizer"] if optimizer is None else optimizer)
    data = load_pairs(pairs, max_words=max_words, strict=strict)
    if saved is not None:  # the run's own tokenizer and model, so the data encodes as before
        tok = ckpt_io.tokenizer_of(saved)
        net_config = from_dict(TransformerConfig, saved.config["model"], "checkpoint model config")
    else:
        if not data.train:
            raise ScrivenError(f"{pairs}: no pairs left for training after the split")
        texts = [p.source for p in data.train] + [p.target for p in data.train]
        tok = BPETokenizer.train(texts, vocab_size=vocab_size)
        net_config = model_config(preset, tok.vocab_size)
        if dropout is not None:
            net_config = replace(net_config, dropout=dropout)
    train_examples, _ = encode_pairs(tok, data.train, net_config.max_len, strict, "training")
    valid_examples, valid_pairs = encode_pairs(tok, data.valid, net_config.max_len, strict,
                                               "validation")
    subset = bleu_subset(len(valid_pairs), bleu_sentences)
    dist = Distributed.from_env()
    dev = resolve_device(device, dist)
    task = TranslationTask(train_examples, valid_examples,
                           [valid_examples[i][0] for i in subset],
                           [valid_pairs[i].target for i in subset], tok, config.max_tokens, seed,
                           dev, dist)
    # What chose the dropout: a resumed run keeps its own record and is not timed again.
    sizing = saved.config.get("sizing") if saved is not None else None
    spent = 0.0
    choice = (budget_dropout(net_config, config, task, dev, dist)
              if saved is None and dropout is None else None)
    if choice is not None:
        net_config = replace(net_config, dropout=choice.dropout)
        sizing, spent = choice.record(), choice.seconds
        if progress and dist.main:
            print(choice.describe(), file=sys.stderr)
    torch.manual_seed(seed)
    net = Transformer(net_config)
    notes: dict[str, Any] = {
        "source": str(pairs), "path": str(data.path.resolve()), "dataset": data.dataset,
        "sha256": file_sha256(data.path),
        "split": {"by": "source sentence", **SPLIT},
        "pairs": {"train": len(train_examples), "valid": len(valid_examples),
                  "test": len(data.test), "malformed": data.malformed,
                  "over_max_words": data.too_long},
        "max_words": max_words,
        "tokenizer": {"kind": "bpe", "vocab_size": tok.vocab_size, "joint": True},
        "bleu_sentences": len(subset),
    }
    if data.dataset is not None:
        ds = get_dataset(data.dataset)
        notes.update(licence=ds.licence, attribution=ds.attribution)
    spec = CheckpointSpec(KIND, to_dict(net_config), tok.to_json_str(), notes, sizing=sizing)
    return fit(net, task, config, out, spec, resume=resume, progress_bar=progress,
               overwrite=overwrite, spent=spent)


def _saved(out: str | Path) -> ckpt_io.Checkpoint:
    saved = ckpt_io.load(Path(out) / "latest")
    if saved.kind != KIND:
        raise ScrivenError(f"--resume: {out} holds a {saved.kind} run, not a translator")
    return saved


def budget_dropout(net_config: TransformerConfig, config: TranslateTrainConfig,
                   task: TranslationTask, device: torch.device,
                   dist: Distributed) -> DropoutChoice | None:
    """The dropout for the passes over the training data that the budget holds
    (`sizing.dropout_for`): known from `epochs`, or from `max_steps` and the batches an epoch
    has; for `minutes`, from the speed of a few timed steps of this model on this machine (the
    seconds spent count against the budget). None under torchrun with minutes alone, where the
    processes would time themselves apart and could disagree: the preset's dropout stays."""
    seconds, speed = 0.0, None
    epochs = float(config.epochs) if config.epochs is not None else math.inf
    if config.max_steps is not None:
        epochs = min(epochs, config.max_steps / max(task.steps_per_epoch(), 1))
    if config.minutes is not None:
        if dist.world > 1:
            return None if math.isinf(epochs) else DropoutChoice(
                dropout_for("translator", epochs), epochs, None, 0.0)
        start = time.perf_counter()
        torch.manual_seed(config.seed)
        speed = time_training(Transformer(net_config), task.batches(0, 0),
                              lambda model, batch: task.loss(model, batch, config.label_smoothing),
                              device, config.amp, config.lr,
                              min(MAX_TIMING_SECONDS, BUDGET_SHARE * config.minutes * 60),
                              config.optimizer)
        seconds = time.perf_counter() - start
        target_tokens = sum(len(target) - 1 for _, target in task.train)
        epochs = min(epochs, budget_tokens(speed, config.minutes * 60 - seconds)
                     / max(target_tokens, 1))
    return DropoutChoice(dropout_for("translator", epochs), epochs, speed, seconds)


@dataclass(frozen=True)
class DropoutChoice:
    """What `budget_dropout` chose and what it measured."""

    dropout: float
    epochs: float             # passes over the training pairs the budget holds
    tokens_per_s: float | None  # the timed speed (target tokens), for a budget of minutes
    seconds: float            # spent timing, taken from the budget

    def describe(self) -> str:
        timed = (f", at the {self.tokens_per_s:,.0f} target tokens/s timed here in "
                 f"{self.seconds:.1f} s" if self.tokens_per_s is not None else "")
        return (f"dropout {self.dropout:g}: the budget holds about {self.epochs:.1f} passes over "
                f"the training pairs{timed}")

    def record(self) -> dict[str, Any]:
        """For the checkpoint."""
        return {"dropout": self.dropout, "budget_epochs": round(self.epochs, 2),
                "timed_tokens_per_s": None if self.tokens_per_s is None
                else round(self.tokens_per_s), "timing_seconds": round(self.seconds, 2)}


# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_translation(checkpoint: str | Path | LoadedTranslator, text: str,
                         device: str = "auto", beam: int = 1, limit: int | None = None,
                         batch_size: int = 64, length_penalty: float = 1.0,
                         split: str = "test", precision: str | None = None) -> dict[str, Any]:
    """BLEU (sacrebleu, cased, 13a tokenisation) and chrF of the checkpoint's translations of a
    pair file or dataset name, with the sacrebleu signatures.

    All pairs of the file are scored, except when `text` is the data the checkpoint was trained
    on (the same dataset name or file): then only its held-out `split` is ("test", or "valid"
    to choose decoding settings without touching the test split), and `pairs` says so.
    `bleu`/`chrf` take each pair's target as the one reference; `bleu_multi_ref` scores each
    distinct source once against all its translations in the scored data. `limit`: score a
    fixed random sample of that many pairs. `beam`, `length_penalty`, `precision`: as in
    `translate`."""
    if limit is not None:
        check_positive_int(limit, "limit")
    check(split in ("test", "valid"), "split", f"must be test or valid, got {split!r}")
    check_search(beam, 1, length_penalty, None, batch_size)
    tr = loaded_translator(checkpoint, device, precision)
    name = str(text)
    trained_on = tr.data.get("dataset")
    trained_path = tr.data.get("path")
    same_data = (name == trained_on if name in DATASETS else
                 trained_path is not None and Path(name).is_file()
                 and Path(name).resolve() == Path(trained_path))
    if same_data:
        data = load_pairs(name, max_words=tr.data.get("max_words"))
        pairs = data.test if split == "test" else data.valid
        scope = (f"held-out {split} split of {name} (the checkpoint's training data): "
                 f"{len(pairs)} pairs")
        if not pairs:
            raise ScrivenError(f"{name}: the {split} split is empty; evaluate on another pair file")
    else:
        check(split == "test", "split", "applies only to the data the checkpoint was trained "
              f"on; {name} is scored whole")
        pairs, report = read_pairs(resolve_text_source(name))
        if report.malformed:
            warnings.warn(report.summary(), stacklevel=2)
        scope = f"all {len(pairs)} pairs of {name}"
    references: dict[str, list[str]] = {}
    for p in pairs:
        references.setdefault(p.source, []).append(p.target)
    if limit is not None and limit < len(pairs):
        pairs = [pairs[i] for i in bleu_subset(len(pairs), limit)]
        scope += f", a fixed random sample of {limit}"
    sources = list(dict.fromkeys(p.source for p in pairs))  # each distinct source once
    ids, cut = tr.encode_sources(sources, [f"source {s!r}" for s in sources])
    warn_cut(tr, cut, [f"source {s!r}" for s in sources])
    start = time.perf_counter()
    found = search_ids(tr.model, ids, beam=beam, length_penalty=length_penalty,
                       batch_size=batch_size)
    seconds = time.perf_counter() - start
    output = {s: translation_text(tr.tokenizer, h[0][0]) for s, h in zip(sources, found)}
    single = _corpus_scores([output[p.source] for p in pairs], [[p.target for p in pairs]])
    n_refs = max(len(references[s]) for s in sources)
    streams = [[references[s][k] if k < len(references[s]) else None for s in sources]
               for k in range(n_refs)]
    multi = _corpus_scores([output[s] for s in sources], streams)
    return {
        "bleu": round(single["bleu"], 2), "chrf": round(single["chrf"], 2),
        "bleu_signature": single["bleu_signature"], "chrf_signature": single["chrf_signature"],
        "bleu_multi_ref": round(multi["bleu"], 2), "chrf_multi_ref": round(multi["chrf"], 2),
        "multi_ref_signature": multi["bleu_signature"],
        "pairs": scope, "sentences": len(pairs), "distinct_sources": len(sources),
        "beam": beam, "length_penalty": length_penalty,
        "precision": getattr(tr, "precision", None),
        "sentences_per_second": round(len(sources) / max(seconds, 1e-9), 1),
    }
