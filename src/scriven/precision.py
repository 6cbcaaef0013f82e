"""Inference precision: the same trained weights, stored and multiplied in fewer bits.

Generating one token reads every weight of the model once, so a single stream is bound by how
fast weights come from memory, and a batch by the matrix units:
  fp32  the model's own numbers;
  bf16  bfloat16 weights and matmuls: half the bytes, and the CPU's bf16 matrix units (AMX)
        where it has them, which is what a batch of streams wants;
  int8  one signed byte per weight with one scale per output row (symmetric, absmax / 127):
        a quarter of the bytes. Here (PyTorch's kernels) multiplied with bf16 activations; an
        LSTM's int8 step on scriven's native kernels (`scriven.accel`) also rounds each
        layer's input to 8 bits.
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
    kernels (measured faster here than multiplying by a transposed view), and never change."""

    def __init__(self, weight: Tensor, bias: Tensor | None, precision: str) -> None:
        check_precision(precision)
        self.precision = precision
        w = weight.detach().float()
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        self.bias = None if bias is None else bias.detach().to(dtype)
        self.scale: Tensor | None = None
        if precision == "int8":
            self.packed, scale = quantize_int8(w)                      # (N, K) int8, (N,)
            self.scale = scale.to(torch.bfloat16)
            w = self.packed.float() * scale[:, None]
        # int8 multiplies a few rows with the packed bytes; a batch is faster through the
        # bf16 matrix units, with the same (dequantized) weights.
        self.weight_t = w.t().to(dtype).contiguous()                   # (K, N)

    def __call__(self, x: Tensor) -> Tensor:
        if self.precision == "fp32":
            return x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        x = x.to(torch.bfloat16)
        if self.scale is not None and x.size(0) < 8:
            y = torch._weight_int8pack_mm(x.contiguous(), self.packed, self.scale)
            y = y if self.bias is None else y + self.bias
        elif self.bias is None:
            y = x @ self.weight_t
        else:
            y = torch.addmm(self.bias, x, self.weight_t)
        return y.float()
