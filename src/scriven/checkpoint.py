"""A checkpoint is a directory anyone can open, written atomically and loaded without unpickling.

    config.json        model kind + model config + training config + data notes + scriven version
    model.safetensors  weights of the unwrapped model
    tokenizer.json     the tokenizer, fixed special ids
    state.safetensors  optimizer tensors, RNG states and task tensors (training checkpoints only)
    trainer.json       step, epoch, data position, schedule and early-stopping state

A directory cannot be replaced in one system call, so `save` writes `<dir>.tmp`, moves the old
directory to `<dir>.old`, moves the new one in and then deletes the old one. `resolve` falls back
to `<dir>.old` if a crash left only that, so a kill at any moment loses at most the newest save.
"""

from __future__ import annotations

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


def save(path: str | Path, ckpt: Checkpoint) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config = {"format": FORMAT_VERSION, "scriven_version": __version__, "kind": ckpt.kind, **ckpt.config}
    write_json_atomic(tmp / "config.json", config)
    save_file(ckpt.weights, str(tmp / "model.safetensors"))
    (tmp / "tokenizer.json").write_text(ckpt.tokenizer_json, encoding="utf-8")
    if ckpt.state:
        save_file({k: v.contiguous() for k, v in ckpt.state.items()}, str(tmp / "state.safetensors"))
    if ckpt.trainer:
        write_json_atomic(tmp / "trainer.json", ckpt.trainer)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
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
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ScrivenError(f"checkpoint file {file} is not a valid safetensors file "
                           f"(truncated, corrupted or a pickle?): {e}") from None


def load(path: str | Path, with_training_state: bool = False) -> Checkpoint:
    directory = resolve(path)
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScrivenError(f"checkpoint {directory}: config.json is corrupted: {e}") from None
    if not isinstance(config, dict) or "kind" not in config:
        raise ScrivenError(f"checkpoint {directory}: config.json has no model kind")
    for name in ("model.safetensors", "tokenizer.json"):
        if not (directory / name).is_file():
            raise ScrivenError(f"checkpoint {directory}: {name} is missing")
    weights = _load_tensors(directory / "model.safetensors")
    tokenizer_json = (directory / "tokenizer.json").read_text(encoding="utf-8")
    state: dict[str, torch.Tensor] = {}
    trainer: dict[str, Any] = {}
    if with_training_state:
        if not (directory / "trainer.json").is_file() or not (directory / "state.safetensors").is_file():
            raise ScrivenError(f"checkpoint {directory}: no training state to resume from")
        state = _load_tensors(directory / "state.safetensors")
        try:
            trainer = json.loads((directory / "trainer.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ScrivenError(f"checkpoint {directory}: trainer.json is corrupted: {e}") from None
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


def load_model(path: str | Path, device: torch.device, kinds: tuple[str, ...]):
    """(model in eval mode on `device`, tokenizer, checkpoint) for a checkpoint of one of `kinds`."""
    from .models import build_model
    ckpt = load(path)
    if ckpt.kind not in kinds:
        raise ScrivenError(f"checkpoint {ckpt.path} holds a {ckpt.kind} model; this needs "
                           f"{' or '.join(kinds)}")
    if "model" not in ckpt.config:
        raise ScrivenError(f"checkpoint {ckpt.path}: config.json has no model config")
    model = build_model(ckpt.kind, ckpt.config["model"])
    load_weights(model, ckpt.weights, str(ckpt.path))
    return model.to(device).eval(), tokenizer_of(ckpt), ckpt
