"""Linear layer whose weight gradient runs on a native AMX kernel when training in bf16.

A linear layer's backward pass makes two products: the input gradient, grad · W, and the
weight gradient, gradᵀ · x, summed over every token of the batch. PyTorch (oneDNN) runs the
second at half to 3/4 of the speed of the first on this CPU: its first operand is transposed.
Profiled in a translator step, weight gradients were a quarter of the step. The kernel in
kernels.c (see `native.weight_grad_bf16`) ran 3,333-row products of the translator's sizes
1.2-1.4x faster than oneDNN (alternating calls), and whole training steps 1.02-1.05x faster
(alternating steps in one process). Everything else, and every other case, is `nn.Linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native


class _AmxLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight = ctx.saved_tensors
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = grad @ weight                                   # (..., in)
        rows = grad.reshape(-1, grad.size(-1))                   # (T, out)
        if ctx.needs_input_grad[1]:
            lib = native.library()
            assert lib is not None
            dweight = native.weight_grad_bf16(lib, rows, x.reshape(-1, x.size(-1)))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = rows.sum(0, dtype=torch.float32).to(grad.dtype)
        return dx, dweight, dbias


def amx_weight_grads() -> bool:
    """Whether bf16 weight gradients can run on the native AMX kernel here."""
    lib = native.library()
    return lib is not None and lib.amx_bf16


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose weight gradient runs on the native
    AMX kernel: when training on the CPU in bf16 (parameters and input), outside autocast, with
    both sizes multiples of 32, where the CPU has AMX. Forward results are identical."""

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu"
                and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16
                and self.in_features % 32 == 0 and self.out_features % 32 == 0
                and x.numel() > 0 and not torch.is_autocast_enabled("cpu")
                and amx_weight_grads()):
            return _AmxLinear.apply(x, self.weight, self.bias)
        return super().forward(x)
