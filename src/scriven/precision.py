"""Inference precision: the same trained weights, stored and multiplied in fewer bits.

Generating one token reads every weight of the model once, so a single stream is bound by how
fast weights come from memory, and a batch by the matrix units:
  fp32  the model's own numbers;
  bf16  bfloat16 weights and matmuls: half the bytes, and the CPU's bf16 matrix units (AMX)
        where it has them, which is what a batch of streams wants;
  int8  one signed byte per weight with one scale per output row (symmetric, absmax / 127):
        a quarter of the bytes. Each matmul also rounds its input to 8 bits per row, so dot
        products are byte products: in scriven's native kernels where they run an LSTM's int8
        step (`scriven.accel`), else in PyTorch's own int8 matmul (fbgemm on x86, QNNPACK on
        ARM; see `FrozenLinear`), else the int8 weights multiplied in fp32.
Activations stay float32 between matmuls.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor, nn

from .config import check

PRECISIONS = ("fp32", "bf16", "int8")
# Layers with fewer weights stay fp32: they are read quickly, and rounding their input costs
# more than it saves. PyTorch's int8 matmul (`PackedInt8`) pays off from smaller layers on than
# bf16 or the float fallback do (measured: docs/benchmarks.md, "Portable int8").
LOW_PRECISION_MIN = 1 << 20
INT8_MATMUL_MIN = 1 << 17


def check_precision(precision: str) -> None:
    check(precision in PRECISIONS, "precision",
          f"must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def worth_lower_precision(weights: int, precision: str) -> bool:
    """Whether a layer of `weights` weights is held in `precision` rather than in fp32."""
    if precision == "fp32":
        return False
    packed = precision == "int8" and PackedInt8.available()
    return weights >= (INT8_MATMUL_MIN if packed else LOW_PRECISION_MIN)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8: weight (N, K) ≈ q (N, K) int8 × scale (N, 1)."""
    scale = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127     # (N, 1)
    q = torch.round(weight / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.squeeze(1)


class FrozenLinear:
    """x (B, K) -> x Wᵀ + b (B, N), float32 in and out, with W (N, K) held in `precision`.
    For inference only: the weights are copied once, laid out for the matmul kernels, and
    never change.

    int8 runs on PyTorch's quantized int8 matmul where this CPU has one (`PackedInt8`), else,
    like bf16, as the precision's numbers (int8 times its row scale, or bf16-rounded) multiplied
    in bf16 where this CPU's bf16 matmuls are fast (`device.bf16_matmuls_fast`), else in fp32:
    emulated bf16 is slower than fp32, so there lower precision changes the numbers but not the
    speed."""

    def __init__(self, weight: Tensor, bias: Tensor | None, precision: str) -> None:
        from .device import bf16_matmuls_fast

        check_precision(precision)
        self.precision = precision
        w = weight.detach().float()
        self.packed = PackedInt8.pack(w, bias) if precision == "int8" else None
        if self.packed is not None:
            return
        if precision == "int8":
            q, scale = quantize_int8(w)                                # (N, K) int8, (N,)
            w = q.float() * scale[:, None]
        elif precision == "bf16":
            w = w.bfloat16().float()
        self.dtype = (torch.bfloat16 if precision != "fp32" and w.device.type == "cpu"
                      and bf16_matmuls_fast() else torch.float32)
        self.bias = None if bias is None else bias.detach().to(self.dtype)
        self.weight_t = w.t().to(self.dtype).contiguous()              # (K, N)

    @property
    def kernel(self) -> str:
        """Which matmul runs: for a benchmark's record."""
        if self.packed is not None:
            return f"int8 ({torch.backends.quantized.engine})"
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return self.packed(x)
        x = x.to(self.dtype)
        y = x @ self.weight_t if self.bias is None else torch.addmm(self.bias, x, self.weight_t)
        return y.float()


class PackedInt8:
    """x (B, K) -> x Wᵀ + b (B, N) on PyTorch's int8 matmul (`torch.ops.quantized`: fbgemm on
    x86 with AVX2 or better, QNNPACK on ARM), with W as `quantize_int8` rounds it.

    PyTorch's op rounds its whole input to 8 bits with one scale, so a row's numbers would
    depend on the rows batched with it. Each row is therefore divided by its own largest
    magnitude first and the output multiplied back, and two input columns held at +1 and -1
    (with zero weights) pin the shared range to [-1, 1]: each row is rounded on its own, the same
    alone or in any batch."""

    ENGINES = ("x86", "fbgemm", "qnnpack")

    def __init__(self, packed: object, bias: Tensor | None, reduce_range: bool) -> None:
        self.packed, self.bias, self.reduce_range = packed, bias, reduce_range
        self.span = torch.tensor([[1.0, -1.0]])                         # (1, 2)

    @staticmethod
    @functools.cache
    def available() -> bool:
        """Whether PyTorch has an int8 matmul for this CPU (tried once on a small layer)."""
        return PackedInt8.pack(torch.ones(4, 4), None) is not None

    @classmethod
    def pack(cls, weight: Tensor, bias: Tensor | None) -> PackedInt8 | None:
        """The packed layer, or None where PyTorch has no int8 matmul for this CPU."""
        engine = torch.backends.quantized.engine
        if weight.device.type != "cpu" or engine not in cls.ENGINES:
            return None
        w = torch.cat([weight.detach().float(), weight.new_zeros(weight.size(0), 2)], 1)
        q, scale = quantize_int8(w)                                    # (N, K + 2), (N,)
        try:
            with warnings.catch_warnings():  # PyTorch marks its quantized tensors deprecated
                warnings.simplefilter("ignore")
                qw = torch.quantize_per_channel(q.float() * scale[:, None], scale.double(),
                                                torch.zeros_like(scale, dtype=torch.long), 0,
                                                torch.qint8)
                packed = torch.ops.quantized.linear_prepack(qw, None)
        except (RuntimeError, AttributeError, NotImplementedError):
            return None
        b = None if bias is None else bias.detach().float()
        # fbgemm's AVX2 byte products add pairs into 16 bits, which saturate unless the
        # input keeps to 7 bits; QNNPACK has no such limit.
        return cls(packed, b, reduce_range=engine != "qnnpack")

    def __call__(self, x: Tensor) -> Tensor:
        x = x.float()
        s = x.abs().amax(1, keepdim=True).clamp(min=1e-30)             # (B, 1)
        x = torch.cat([x / s, self.span.expand(x.size(0), 2)], 1)       # (B, K + 2) in [-1, 1]
        y = torch.ops.quantized.linear_dynamic(x, self.packed, self.reduce_range)   # (B, N)
        return y * s if self.bias is None else torch.addcmul(self.bias, y, s)


class HeldLinear(nn.Module):
    """An `nn.Linear` for inference with its weights held in a precision (`FrozenLinear`);
    input (..., K) -> (..., N) float32. It keeps the original parameters, so the model's
    parameter count and state-dict keys do not change, but computes with the held copy."""

    def __init__(self, linear: nn.Linear, precision: str) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.held = FrozenLinear(linear.weight, linear.bias, precision)

    def forward(self, x: Tensor) -> Tensor:
        return self.held(x.reshape(-1, x.size(-1))).view(*x.shape[:-1], -1)


def hold_linears(model: nn.Module, precision: str) -> int:
    """Replace, in place, each `nn.Linear` of a model used for inference only by a
    `HeldLinear` in `precision`, where that pays (`worth_lower_precision`; fp32 changes
    nothing); returns how many were replaced."""
    check_precision(precision)
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and worth_lower_precision(child.weight.numel(), precision)]
    for parent, name, child in swaps:
        setattr(parent, name, HeldLinear(child, precision))
    return len(swaps)
