"""Inference precision: the same trained weights, stored and multiplied in fewer bits.

Generating one token reads every weight of the model once, so a single stream is bound by how
fast weights come from memory, and a batch by the matrix units:
  fp32  the model's own numbers;
  bf16  bfloat16 weights and matmuls: half the bytes, and the CPU's bf16 matrix units (AMX)
        where it has them, which is what a batch of streams wants;
  int8  one signed byte per weight with one scale per output row (symmetric, absmax / 127):
        a quarter of the bytes where scriven's native kernels run an LSTM's int8 step
        (`scriven.accel`; they also round each layer's input to 8 bits); elsewhere the int8
        numbers multiplied in bf16 or fp32 (see `FrozenLinear`).
Activations stay float32 between matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import check

PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(precision: str) -> None:
    check(precision in PRECISIONS, "precision",
          f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: weight (N, K) ≈ q (N, K) int8 × scale (N, 1)."""
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127     # (N, 1)
    q = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(1)


class FrozenLinear:
    """x (B, K) -> x Wᵀ + b (B, N), float32 in and out, with W (N, K) held in `precision`.
    For inference only: the weights are copied once, laid out as (K, N) rows for the matmul
    kernels, and never change.

    The numbers are those of the precision's weights (bf16-rounded, or int8 times its row
    scale). They are multiplied in bf16 where this CPU's bf16 matmuls are fast
    (`device.bf16_matmuls_fast`), else in fp32: emulated bf16 is slower than fp32, so there
    lower precision changes the numbers but not the speed."""

    def __init__(self, weight: Tensor, bias: Tensor | None, precision: str) -> None:
        from .device import bf16_matmuls_fast

        check_precision(precision)
        self.precision = precision
        w = weight.detach().float()
        if precision == "int8":
            q, scale = quantize_int8(w)                                # (N, K) int8, (N,)
            w = q.float() * scale[:, None]
        elif precision == "bf16":
            w = w.bfloat16().float()
        self.dtype = (torch.bfloat16 if precision != "fp32" and w.device.type == "cpu"
                      and bf16_matmuls_fast() else torch.float32)
        self.bias = None if bias is None else bias.detach().to(self.dtype)
        self.weight_t = w.t().to(self.dtype).contiguous()              # (K, N)

    def __call__(self, x: Tensor) -> Tensor:
        x = x.to(self.dtype)
        y = x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        return y.float()
