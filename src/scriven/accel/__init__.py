"""The accelerator layer: everything scriven does to run faster than plain PyTorch on a
particular machine.

Models are plain PyTorch (`nn.Linear`, `nn.LayerNorm`, `nn.Dropout`, SDPA) and every machine
runs them as they are. Where this CPU can run scriven's native kernels (AVX-512 VNNI, and AMX
for bf16 weight gradients), `apply` swaps faster parts in from outside, once, when training or
generation starts, and says what it swapped and why. The int8 generation step and the
samplers (`lstm_int8_step`, `sample_top_k`, `sample_plain`) also have an AVX2 build, for CPUs
without AVX-512.

    model = Transformer(config)
    report = accel.apply(model, device, mode="train")
    # {"attention": "native kernel up to 64 keys, else SDPA (6 layers)", "layer_norm": ...}

Each swapped module keeps the parameters and state-dict keys of the one it replaces, and gives
the same numbers within rounding (tests/test_accel.py).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from . import native

MODES = ("train", "infer")


def native_available() -> bool:
    """Whether scriven's native CPU kernels load on this machine."""
    return native.library() is not None


def unavailable_reason() -> str | None:
    """Why the native kernels do not load here (None when they do)."""
    return native.unavailable()


def _swap_modules(model: nn.Module, counts: Counter) -> None:
    """Training swaps: hashed dropout, the native layer norm and (on AMX) linear layers whose
    weight gradients run on the tile units. The vocabulary projection is left alone: its
    training gradient comes from the fused loss, or it is tied to an embedding."""
    from .dropout import HashDropout
    from .layernorm import NativeLayerNorm
    from .layernorm import fits as norm_fits
    from .linear import AmxLinear
    from .linear import fits as linear_fits

    amx = native.amx_bf16()
    for name, module in model.named_modules():
        kind = type(module)
        if kind is nn.Dropout and module.p > 0.0 and not module.inplace:
            module.__class__ = HashDropout  # same attributes, another forward
            counts["dropout"] += 1
        elif kind is nn.LayerNorm and norm_fits(module):
            module.__class__ = NativeLayerNorm
            counts["layer_norm"] += 1
        elif (kind is nn.Linear and amx and linear_fits(module)
              and name.rsplit(".", 1)[-1] not in ("output", "head")):
            module.__class__ = AmxLinear
            counts["linear"] += 1


def _swap_portable(model: nn.Module, mode: str) -> dict[str, str]:
    """Without the kernels, training still swaps dropout for masks drawn 64 bits at a time:
    PyTorch ops, so any CPU runs them, measured faster than `nn.Dropout` (docs/benchmarks.md)."""
    from .dropout import BitsDropout

    n = 0
    if mode == "train":
        for module in model.modules():
            if type(module) is nn.Dropout and module.p > 0.0 and not module.inplace:
                module.__class__ = BitsDropout
                n += 1
    return {"dropout": f"16 random bits per element, drawn 64 at a time ({n})"} if n else {}


def apply(model: nn.Module, device: torch.device | str = "cpu", mode: str = "train") -> dict[str, str]:
    """Swap into `model`, in place, what this machine runs faster than plain PyTorch, for
    `mode` "train" or "infer"; returns {part: what runs it, and why}. Safe to call twice."""
    from ..attention import MultiHeadAttention
    from ..models.transformer import Transformer

    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    device = torch.device(device)
    if device.type != "cpu":
        return {"all": f"PyTorch's kernels on {device.type} (SDPA, fused AdamW)"}
    why = native.unavailable()
    if why is not None:
        return {**_swap_portable(model, mode), "all": f"plain PyTorch otherwise (native kernels "
                                                      f"unavailable: {why})"}
    from .attention import short_attention
    from .losses import linear_cross_entropy

    counts: Counter = Counter()
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.kernel = short_attention
            counts["attention"] += 1
    if mode == "train":
        _swap_modules(model, counts)
        if isinstance(model, Transformer):
            model.fused_loss = linear_cross_entropy
            counts["loss"] += 1
    what = {
        "attention": "native kernel up to 64 keys, head size a multiple of 16, else SDPA",
        "dropout": "hashed mask on the native kernel",
        "layer_norm": "native kernel while training",
        "linear": "bf16 weight gradients on AMX tiles",
        "loss": "vocabulary projection fused into the cross-entropy",
    }
    report = {part: f"{what[part]} ({n})" for part, n in sorted(counts.items())}
    return report or {"all": "plain PyTorch (nothing here for the native kernels to run)"}


def sample_top_k(logits: torch.Tensor, k: int | torch.Tensor, temperature: float | torch.Tensor,
                 uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Top-k sampling in one pass over each row on the native kernel, k and temperature one for
    all rows or one per row (R,): the ids and probabilities `sampling.sample_rows` draws from the
    same uniform numbers, or None where the kernel does not apply (no kernels, not float32 on the
    CPU, a k over `native.MAX_TOP_K`). With k at the vocabulary size nothing is cut, and the
    PyTorch sampler then walks the tokens by id rather than by rank: the kernel declines, so a
    seed picks the same tokens with and without it."""
    if (native.generation_library() is None or logits.device.type != "cpu" or logits.dim() != 2
            or logits.dtype != torch.float32 or not logits.size(0)):
        return None
    low, high = (k, k) if isinstance(k, int) else (int(k.min()), int(k.max()))
    coolest = float(temperature.min()) if isinstance(temperature, torch.Tensor) else temperature
    if not (0 < low and high <= native.MAX_TOP_K and high < logits.size(1) and coolest > 0):
        return None
    return native.sample_top_k(logits, k, temperature, uniform)


def sample_plain(logits: torch.Tensor,
                 uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Sampling from the whole softmax of logits already divided by the temperature, on the
    native kernel (two passes over each row): the ids and probabilities `sampling` draws from the
    same uniform numbers (up to where a number falls within rounding of a boundary between two
    tokens), or None where the kernel does not apply (no generation kernels, not float32 (B, V)
    on the CPU)."""
    if (native.generation_library() is None or logits.device.type != "cpu" or logits.dim() != 2
            or logits.dtype != torch.float32 or not logits.size(1)):
        return None
    return native.sample_plain(logits, uniform)


def lstm_int8_step(model: nn.Module) -> native.LSTMStepInt8 | None:
    """A whole int8 generation step of an LSTM language model on the native kernels (AVX-512
    VNNI, or their AVX2 build), where they run here and the model has no projections; else None
    (the caller keeps PyTorch's path)."""
    lstm, head = model.lstm, model.head
    if (native.generation_library() is None or lstm.proj_size != 0
            or head.weight.device.type != "cpu"):
        return None
    layers = [(getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}"),
               getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}"))
              for k in range(lstm.num_layers)]
    return native.LSTMStepInt8(model.embed.weight, layers, head.weight, head.bias)
