"""Linear layer whose weight gradient runs on a native AMX kernel when training in bf16.

A linear layer's backward pass makes two products: the input gradient, grad · W, and the
weight gradient, gradᵀ · x, summed over every token of the batch. oneDNN runs the second at
half to 3/4 of the speed of the first on AMX CPUs (its first operand is transposed), and in a
profiled translator step weight gradients were a quarter of the step. The kernel in kernels.c
(see `native.weight_grad_bf16`) computes it on the tile units directly.
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
            dweight = native.weight_grad_bf16(rows, x.reshape(-1, x.size(-1)))  # (out, in)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = rows.sum(0, dtype=torch.float32).to(grad.dtype)
        return dx, dweight, dbias


def fits(linear: nn.Linear) -> bool:
    """Whether the kernel takes this layer's sizes (both multiples of 32)."""
    return linear.in_features % 32 == 0 and linear.out_features % 32 == 0


class AmxLinear(nn.Linear):
    """`nn.Linear` (same parameters and state dict) whose weight gradient runs on the AMX
    kernel when training on the CPU in bf16 (parameters and input), outside autocast. Forward
    results are identical."""

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and self.weight.requires_grad and x.device.type == "cpu"
                and x.dtype == torch.bfloat16 and self.weight.dtype == torch.bfloat16
                and x.numel() > 0 and not torch.is_autocast_enabled("cpu")):
            return _AmxLinear.apply(x, self.weight, self.bias)
        return super().forward(x)
