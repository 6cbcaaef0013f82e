"""Running exports (see `scriven.export`): language models on ONNX Runtime, translators on
CTranslate2. They plug into the same loops as the PyTorch models: an `OnnxStepper` reads a
prompt and steps one token like an `LSTMStepper` (so `generation.sample_ids` drives it with
scriven's own sampling rules), and `CT2Translator.translate` takes `translator.translate`'s
options."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .errors import ScrivenError
from .export import read_info, require
from .pairs import encode_sources
from .search import length_batches, output_limit
from .stepper import join_lstm, select_lstm
from .tokenizers import BOS, EOS, UNK_ID, Tokenizer, load_tokenizer


def _session(file: Path, threads: int | None) -> Any:
    ort = require("onnxruntime", "onnx")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    # By default ONNX Runtime's threads spin after each run, waiting for the next. Here the
    # caller samples with PyTorch between runs, and spinning threads take the cores from it:
    # 64 streams generated 3.5x slower (docs/benchmarks.md, "ONNX Runtime's threads").
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for unreadable models
        raise ScrivenError(f"{file}: ONNX Runtime cannot load it: {e}") from None


def _checked(path: str | Path, kinds: tuple[str, ...]) -> dict[str, Any]:
    info = read_info(path)
    if info["kind"] not in kinds:
        raise ScrivenError(f"export {path} holds a {info['kind']} model; this needs "
                           f"{' or '.join(kinds)}")
    return info


class OnnxStepper:
    """An exported language model, one token per call: `read(ids (B, T))` → logits (B, V) and
    a state; `step(ids (B,), state)` → logits and the next state. Logits come back as torch
    tensors, so scriven's sampling functions apply unchanged. An LSTM's state is a torch (h, c)
    laid out as `LSTMStepper`'s, (L, B, H) each: the server's continuous batching stacks and
    selects rows of it along B the same way for both.

    A GPT's context is bounded as a checkpoint's `stepper.GPTStepper` bounds it: when the cache
    holds the trained context (export.json's "context"; max_len in exports made before it was
    written), the newest half of the text is read again into a fresh cache."""

    def __init__(self, path: str | Path, info: dict[str, Any], threads: int | None = None) -> None:
        self.path = Path(path)
        self.info = info
        self.kind = info["kind"]
        self.step_session = _session(self.path / "step.onnx", threads)
        prompt = self.path / "prompt.onnx"
        self.prompt_session = _session(prompt, threads) if prompt.is_file() else None
        config = info["model"]
        if self.kind == "lstm":
            n = config["num_layers"]
            proj = config["embed_dim"] if (config.get("tie_embeddings")
                                           and config["embed_dim"] != config["hidden_dim"]) else 0
            self.h_shape = (n, proj or config["hidden_dim"])
            self.c_shape = (n, config["hidden_dim"])
        else:
            self.context = min(info.get("context") or config["max_len"], config["max_len"])
            heads = config["n_heads"]
            self.cache_shape = (config["n_layers"], heads, config["d_model"] // heads)

    def read(self, ids: Tensor, state: Any = None) -> tuple[Tensor, Any]:
        ids_np = ids.cpu().numpy().astype(np.int64)                          # (B, T)
        b = ids_np.shape[0]
        if self.kind == "gpt":
            history = ids_np[:, -self.context:]
            layers, heads, dh = self.cache_shape
            empty = np.zeros((layers, b, heads, 0, dh), np.float32)
            logits, keys, values = self.step_session.run(None, {"ids": history, "keys": empty,
                                                                "values": empty})
            return torch.from_numpy(logits), (keys, values, history)
        if state is None:
            h = np.zeros((self.h_shape[0], b, self.h_shape[1]), np.float32)
            c = np.zeros((self.c_shape[0], b, self.c_shape[1]), np.float32)
        else:
            h, c = _arrays(state)
        if self.prompt_session is not None:
            logits, h, c = self.prompt_session.run(None, {"ids": ids_np, "h": h, "c": c})
        else:  # an LSTM with a projection: no prompt graph, so one step per prompt token
            for t in range(ids_np.shape[1]):
                logits, h, c = self.step_session.run(None, {"ids": ids_np[:, t], "h": h, "c": c})
        return torch.from_numpy(logits), (torch.from_numpy(h), torch.from_numpy(c))

    def step(self, ids: Tensor, state: Any) -> tuple[Tensor, Any]:
        ids_np = ids.cpu().numpy().astype(np.int64)                          # (B,)
        if self.kind == "lstm":
            h, c = _arrays(state)
            logits, h, c = self.step_session.run(None, {"ids": ids_np, "h": h, "c": c})
            return torch.from_numpy(logits), (torch.from_numpy(h), torch.from_numpy(c))
        keys, values, history = state
        history = np.concatenate([history, ids_np[:, None]], axis=1)
        if keys.shape[3] >= self.context:
            return self.read(torch.from_numpy(history[:, -(self.context // 2):]))
        logits, keys, values = self.step_session.run(None, {"ids": ids_np[:, None], "keys": keys,
                                                            "values": values})
        return torch.from_numpy(logits), (keys, values, history)

    def select(self, state: Any, index: Tensor) -> Any:
        """Rows `index` (R,) of a state (see `scriven.stepper`)."""
        if self.kind == "lstm":
            return select_lstm(state, index)
        keys, values, history = state
        rows = index.cpu().numpy()
        return keys[:, rows], values[:, rows], history[rows]

    def join(self, a: Any, b: Any) -> Any:
        """Two states' rows stacked, or None where a GPT's caches differ in length."""
        if self.kind == "lstm":
            return join_lstm(a, b)
        if a[2].shape[1] != b[2].shape[1]:
            return None
        return (np.concatenate([a[0], b[0]], 1), np.concatenate([a[1], b[1]], 1),
                np.concatenate([a[2], b[2]]))


def _arrays(state: tuple[Tensor, Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(h, c) as ONNX Runtime takes them: C-contiguous float32 arrays, whatever layout the
    tensors that the caller stacked or selected rows of have."""
    h, c = (np.ascontiguousarray(s.detach().cpu().numpy(), np.float32) for s in state)
    return h, c


def load_lm(path: str | Path, threads: int | None = None) -> tuple[OnnxStepper, Tokenizer]:
    """The stepper and tokenizer of an exported language model."""
    info = _checked(path, ("lstm", "gpt"))
    return OnnxStepper(path, info, threads), load_tokenizer(Path(path) / "tokenizer.json")


@dataclass
class CT2Translator:
    """An exported translator on CTranslate2: load once, translate many times."""

    translator: Any
    tokenizer: Tokenizer
    max_len: int
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", threads: int = 0) -> CT2Translator:
        info = _checked(path, ("transformer",))
        ct2 = require("ctranslate2", "ctranslate2")
        if device not in ("auto", "cpu", "cuda"):
            raise ScrivenError(f"device {device!r}: a CTranslate2 export runs on auto, cpu or cuda")
        on_cpu = device == "cpu" or (device == "auto" and not ct2.get_cuda_device_count())
        workers, per_worker = cpu_workers(threads or torch.get_num_threads()) if on_cpu else (1, 0)
        try:
            translator = ct2.Translator(str(Path(path) / "ctranslate2"), device=device,
                                        inter_threads=workers, intra_threads=per_worker)
        except (RuntimeError, ValueError) as e:
            raise ScrivenError(f"export {path}: CTranslate2 cannot load it: {e}") from None
        return cls(translator, load_tokenizer(Path(path) / "tokenizer.json"),
                   info["model"]["max_len"], Path(path), dict(info.get("data") or {}))

    def encode_sources(self, texts: Sequence[str], names: Sequence[str] | None = None
                       ) -> tuple[list[list[int]], list[int]]:
        """Normalised, encoded sources, exactly as a checkpoint's translator makes them."""
        return encode_sources(self.tokenizer, self.max_len, texts, names)

    def search_ids(self, sources: Sequence[Sequence[int]], beam: int = 1, n_best: int = 1,
                   length_penalty: float = 1.0, max_len: int | None = None,
                   batch_size: int = 64) -> list[list[tuple[list[int], float | None]]]:
        """`translator.search_ids` on CTranslate2: sources sorted by length into batches; beam
        search batches only sentences that share an output limit (the result depends on it).

        CTranslate2 divides a finished hypothesis's log-probability by length^length_penalty
        where scriven uses GNMT's ((5 + length) / 6)^length_penalty; with length_penalty 0 both
        rank by plain log-probability."""
        limit_of = [max_len or output_limit(self.max_len, len(s)) for s in sources]
        tok = self.tokenizer
        results: list[list[tuple[list[int], float | None]]] = [[] for _ in sources]
        batches = length_batches(sources, limit_of, beam, batch_size)
        # All batches are queued at once: the translator's workers take them in parallel.
        pending = [self.translator.translate_batch(
            [[tok.id_to_token(t) for t in sources[i]] for i in rows], beam_size=beam,
            num_hypotheses=n_best, length_penalty=length_penalty,
            max_decoding_length=max(limit_of[i] for i in rows), return_scores=beam > 1,
            asynchronous=True) for rows in batches]
        for rows, futures in zip(batches, pending):
            for i, result in zip(rows, (f.result() for f in futures)):
                hyps = []
                for pieces, score in zip(result.hypotheses, result.scores or [None] * n_best):
                    ids = [tok.token_to_id(p) for p in pieces if p not in (BOS, EOS)]
                    ids = [UNK_ID if t is None else t for t in ids][: limit_of[i]]
                    hyps.append((ids, None if beam == 1 else float(score)))
                results[i] = hyps
        return results


def cpu_workers(threads: int) -> tuple[int, int]:
    """(workers, threads each) for CTranslate2 on `threads` CPU threads. Two workers that each
    decode a batch on half the threads translate many sentences faster than one worker that
    splits every batch's small matrices between all of them (docs/benchmarks.md,
    "CTranslate2's workers"); a lone batch loses little, as its matrices split poorly."""
    workers = 2 if threads >= 2 else 1
    return workers, max(1, threads // workers)


def load_translator(path: str | Path, device: str = "auto", threads: int = 0) -> CT2Translator:
    """An exported translator on `threads` threads (0: as many as PyTorch uses)."""
    return CT2Translator.load(path, device, threads)
