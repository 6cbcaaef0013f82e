"""Layer norm on a native kernel for training on the CPU.

PyTorch's CPU layer norm and its backward pass were some 6 % of a translator's training step
(profiled). The kernel makes one pass per row, keeping the row in vector registers: mean,
variance and the affine output in the forward pass; in the backward pass the input gradient
together with the weight and bias gradients (summed per thread, then over threads).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import native


class _NativeLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        rows = x.reshape(-1, x.size(-1))  # (N, D)
        y, mean, rstd = native.layer_norm_forward(rows, weight, bias, eps)
        ctx.save_for_backward(rows, weight, mean, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, weight, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = native.layer_norm_backward(rows, weight, mean, rstd,
                                                        grad.reshape(rows.shape))
        return dx.view(grad.shape), dweight.to(weight.dtype), dbias.to(weight.dtype), None


def fits(norm: nn.LayerNorm) -> bool:
    """Whether the kernel takes this norm's shape: one dimension, a multiple of 16 up to
    `native.LAYER_NORM_MAX_D`, with weight and bias."""
    (d,) = norm.normalized_shape if len(norm.normalized_shape) == 1 else (0,)
    return 0 < d <= native.LAYER_NORM_MAX_D and d % 16 == 0 and norm.elementwise_affine \
        and norm.bias is not None


class NativeLayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` (same parameters and state dict) on the native kernel when training: for
    inputs that need a gradient, contiguous on the CPU, float32 or bf16 matching its parameters,
    outside autocast (which picks the norm's dtype itself). Inference stays on PyTorch's kernel,
    quicker for the few rows of a decoding step."""

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and x.requires_grad and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.bfloat16)
                and x.dtype == self.weight.dtype and x.is_contiguous() and x.numel() > 0
                and not torch.is_autocast_enabled("cpu")):
            return _NativeLayerNorm.apply(x, self.weight, self.bias, self.eps)
        return super().forward(x)
