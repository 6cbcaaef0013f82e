"""A checkpoint is a directory anyone can open, written atomically and loaded without unpickling.

    config.json        model kind + model config + training config + data notes + scriven version
    model.safetensors  weights of the unwrapped model
    tokenizer.json     the tokenizer, fixed special ids
    state.safetensors  optimizer tensors, RNG states and task tensors (training checkpoints only)
    trainer.json       step, epoch, data position, schedule and early-stopping state

A directory cannot be replaced in one system call, so `save` writes `<dir>.tmp`, moves the old
directory to `<dir>.old`, moves the new one in and then deletes the old one. `resolve` falls back
to `<dir>.old` if a crash left only that, so a kill at any moment loses at most the newest save.
Files and directories are fsynced before each rename, so a power cut cannot leave a renamed
directory with empty files in it; a failed write (a full disk) removes the half-written copy and
keeps the previous one.

Nothing in a checkpoint is trusted: every file is read defensively, shapes in config.json are
checked against the safetensors headers before a model is built, and a bad file is a one-line
`ScrivenError` naming it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .errors import ScrivenError

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    """What a checkpoint directory holds, in memory."""

    kind: str                      # "lstm" | "transformer" | "gpt"
    config: dict[str, Any]         # {"model": {...}, "train": {...}, "data": {...}, ...}
    weights: dict[str, torch.Tensor]
    tokenizer_json: str
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped model (no DDP/compile prefixes), tied weights stored once."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    seen: dict[int, str] = {}
    out = {}
    for name, tensor in inner.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue  # a tied weight: loading restores the tie through the module itself
        seen[key] = name
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(path: str | Path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` to the directory `path` atomically. A write that fails (a full disk, a
    read-only folder) is a `ScrivenError`; the previous checkpoint at `path` is left intact."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        config = {"format": FORMAT_VERSION, "scriven_version": __version__, "kind": ckpt.kind,
                  **ckpt.config}
        write_json_atomic(tmp / "config.json", config)
        save_file(ckpt.weights, str(tmp / "model.safetensors"))
        (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
        if ckpt.state:
            save_file({k: v.contiguous() for k, v in ckpt.state.items()},
                      str(tmp / "state.safetensors"))
        if ckpt.trainer:
            write_json_atomic(tmp / "trainer.json", ckpt.trainer)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ScrivenError(f"cannot write checkpoint {path}: {reason}; the previous checkpoint "
                           "there is kept") from None
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def resolve(path: str | Path) -> Path:
    """The checkpoint directory to read: `path`, or a run folder's `best`/`latest`, or the `.old`
    copy a crash mid-save left behind."""
    path = Path(path)
    candidates = [path, path / "best", path / "latest"]
    for c in candidates:
        if (c / "config.json").is_file():
            return c
        old = c.with_name(c.name + ".old")
        if (old / "config.json").is_file():
            return old
    if not path.exists():
        raise ScrivenError(f"checkpoint {path}: no such file or directory")
    raise ScrivenError(f"checkpoint {path}: not a scriven checkpoint (no config.json)")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError, MemoryError) as e:
        raise ScrivenError(f"checkpoint file {file} is not a valid safetensors file "
                           f"(truncated, corrupted or a pickle?): {e}") from None


def _read_text(file: Path, directory: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ScrivenError(f"checkpoint {directory}: {file.name} is not UTF-8 text") from None
    except OSError as e:
        raise ScrivenError(f"checkpoint {directory}: cannot read {file.name} "
                           f"({e.strerror or e})") from None


def _read_json(file: Path, directory: Path) -> Any:
    text = _read_text(file, directory)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ScrivenError(f"checkpoint {directory}: {file.name} is corrupted: {e}") from None
    except RecursionError:
        raise ScrivenError(f"checkpoint {directory}: {file.name} is nested too deeply") from None


def load(path: str | Path, with_training_state: bool = False) -> Checkpoint:
    directory = resolve(path)
    config = _read_json(directory / "config.json", directory)
    if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
        raise ScrivenError(f"checkpoint {directory}: config.json has no model kind")
    version = config.get("format", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ScrivenError(f"checkpoint {directory}: config.json has an invalid format "
                           f"{version!r}")
    if version > FORMAT_VERSION:
        raise ScrivenError(f"checkpoint {directory} has format {version}, newer than this scriven "
                           f"{__version__} reads (up to {FORMAT_VERSION}): upgrade scriven")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (directory / name).is_file():
            raise ScrivenError(f"checkpoint {directory}: {name} is missing")
    weights = _load_tensors(directory / "model.safetensors")
    tokenizer_json = _read_text(directory / "tokenizer.json", directory)
    state: dict[str, torch.Tensor] = {}
    trainer: dict[str, Any] = {}
    if with_training_state:
        if not (directory / "trainer.json").is_file() or not (directory / "state.safetensors").is_file():
            raise ScrivenError(f"checkpoint {directory}: no training state to resume from")
        state = _load_tensors(directory / "state.safetensors")
        trainer = _read_json(directory / "trainer.json", directory)
        if not (isinstance(trainer, dict) and isinstance(trainer.get("progress"), dict)
                and isinstance(trainer.get("param_groups"), list)):
            raise ScrivenError(f"checkpoint {directory}: trainer.json is not training state")
    kind = config.pop("kind")
    config.pop("format", None)
    config.pop("scriven_version", None)
    return Checkpoint(kind, config, weights, tokenizer_json, state, trainer, directory)


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Load weights into `model`, naming what does not fit instead of a raw traceback."""
    expected = model.state_dict()
    tied = {n for n in expected if n not in weights}
    # Tied weights are saved once; they must be reachable through another saved name.
    ptrs = {expected[n].data_ptr() for n in weights if n in expected}
    missing = [n for n in tied if expected[n].data_ptr() not in ptrs]
    unexpected = [n for n in weights if n not in expected]
    if missing or unexpected:
        raise ScrivenError(f"checkpoint {where}: weights do not match the model "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, tensor in weights.items():
        if expected[name].shape != tensor.shape:
            raise ScrivenError(f"checkpoint {where}: weight {name} has shape {tuple(tensor.shape)}, "
                               f"the model expects {tuple(expected[name].shape)}")
    model.load_state_dict(weights, strict=False)


def tokenizer_of(ckpt: Checkpoint):  # -> Tokenizer
    from .tokenizers import from_json_str
    try:
        return from_json_str(ckpt.tokenizer_json)
    except ScrivenError as e:
        raise ScrivenError(f"checkpoint {ckpt.path}: tokenizer.json: {e}") from None
    except RecursionError:
        raise ScrivenError(f"checkpoint {ckpt.path}: tokenizer.json is nested too deeply") from None
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
        # A file of the right format with a field missing or of the wrong type.
        raise ScrivenError(f"checkpoint {ckpt.path}: tokenizer.json is damaged "
                           f"({type(e).__name__}: {e})") from None


def _model_skeleton(kind: str, model_config: Any, where: Path | None) -> nn.Module:
    """The model of a config on the meta device: shapes without memory, so a config that
    claims a vocabulary of 10^12 costs nothing to check."""
    from .models import build_model
    if not isinstance(model_config, dict):
        raise ScrivenError(f"checkpoint {where}: config.json has no model config")
    try:
        with torch.device("meta"):
            return build_model(kind, model_config)
    except ScrivenError as e:
        raise ScrivenError(f"checkpoint {where}: config.json: {e}") from None
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise ScrivenError(f"checkpoint {where}: config.json has an unusable model config "
                           f"({e})") from None


def check_shapes(ckpt: Checkpoint) -> None:
    """The model config's shapes must be the weights' shapes and the tokenizer's vocabulary
    the model's; checked before the model is built for real."""
    skeleton = _model_skeleton(ckpt.kind, ckpt.config.get("model"), ckpt.path)
    expected = skeleton.state_dict()
    for name, tensor in ckpt.weights.items():
        if name in expected and tuple(expected[name].shape) != tuple(tensor.shape):
            raise ScrivenError(f"checkpoint {ckpt.path}: config.json gives weight {name} the "
                               f"shape {tuple(expected[name].shape)}, model.safetensors holds "
                               f"{tuple(tensor.shape)}")


def check_vocabulary(ckpt: Checkpoint, tokenizer) -> None:
    """Every id the tokenizer makes must be an embedding row and every id the model predicts a
    token: the two vocabularies must be the same size, and a BPE file's ids (which it lists
    explicitly) must all lie below it."""
    hf = getattr(tokenizer, "hf_tokenizer", None)
    largest = max(hf.get_vocab(with_added_tokens=True).values(), default=-1) if hf else -1
    for key, size in (ckpt.config.get("model") or {}).items():
        if not key.endswith("vocab_size"):
            continue
        if size != tokenizer.vocab_size:
            raise ScrivenError(f"checkpoint {ckpt.path}: tokenizer.json has {tokenizer.vocab_size} "
                               f"tokens, the model's {key} is {size}: they do not belong together")
        if largest >= size:
            raise ScrivenError(f"checkpoint {ckpt.path}: tokenizer.json has token id {largest}, "
                               f"out of range for the model's {key} of {size}")


def load_model(path: str | Path, device: torch.device, kinds: tuple[str, ...]):
    """(model in eval mode on `device`, tokenizer, checkpoint) for a checkpoint of one of `kinds`."""
    from .models import build_model
    ckpt = load(path)
    if ckpt.kind not in kinds:
        raise ScrivenError(f"checkpoint {ckpt.path} holds a {ckpt.kind} model; this needs "
                           f"{' or '.join(kinds)}")
    if "model" not in ckpt.config:
        raise ScrivenError(f"checkpoint {ckpt.path}: config.json has no model config")
    check_shapes(ckpt)
    tokenizer = tokenizer_of(ckpt)
    check_vocabulary(ckpt, tokenizer)
    model = build_model(ckpt.kind, ckpt.config["model"])
    load_weights(model, ckpt.weights, str(ckpt.path))
    return model.to(device).eval(), tokenizer, ckpt


def trained_context(config: dict) -> int:
    """The most tokens a GPT checkpoint (its config.json as a dict) may read at once: the
    window it was trained on. Checkpoints from this version have max_len equal to it; older ones
    were built with the preset's max_len (256) and trained on shorter windows, so their training
    config's seq_len says how far their positions were trained."""
    max_len = config["model"]["max_len"]
    seq_len = config.get("train", {}).get("seq_len")
    return min(max_len, seq_len) if isinstance(seq_len, int) and seq_len > 0 else max_len
