"""Label-smoothed cross-entropy fused with the output projection (the accelerated form of
`F.cross_entropy(output(hidden).float(), labels)`, which the plain models compute).

Training a translator on a CPU spends much of each step around the vocabulary: the (N, V)
logits are written, cast to fp32, turned into log-probabilities, and read and written again in
the backward pass, each a trip through memory for a tensor of tens of megabytes.
`linear_cross_entropy` instead makes the logits a block of rows at a time, turns each block in
place into its loss and its gradient (in fp32, a row at a time on the native kernel), and feeds
that gradient straight to the two matmuls of the backward pass (to the hidden states and to the
weights), while the block is still in cache. The loss's gradient is known in the forward pass
because the loss is a scalar; the backward pass only hands it out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import native


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                         label_smoothing: float = 0.0, block_rows: int = 512) -> Tensor:
    """Mean over rows of the label-smoothed cross-entropy of `hidden @ weight.T + bias`.

    hidden (N, D), weight (V, D), bias (V,) or None, labels (N,) in [0, V) → scalar. Equals
    `F.cross_entropy(F.linear(hidden, weight, bias).float(), labels,
    label_smoothing=label_smoothing)` (tested). The matmuls run in the autocast dtype when
    autocast is on, else in `hidden`'s dtype; softmax and loss are computed in fp32.

    Rows go `block_rows` at a time: big enough for efficient products, small enough that a
    block of logits stays in cache (the measured choice is in docs/benchmarks.md).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.size(1) != weight.size(1):
        raise ValueError(f"hidden (N, D) and weight (V, D) expected, got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be ({hidden.size(0)},), got {tuple(labels.shape)}")
    if hidden.size(0) == 0:
        raise ValueError("linear_cross_entropy of no rows")
    dtype = hidden.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
    with torch.autocast(hidden.device.type, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, labels, float(label_smoothing),
                                         int(block_rows), dtype)


def _block_grad(block: Tensor, labels: Tensor, bias: Tensor | None, keep: float, spread: float,
                scale: float, bias_grad: Tensor | None, sub_rows: int = 64) -> Tensor:
    """PyTorch version of the native kernel: loss of each row of `block` (c, V), which is
    overwritten with d loss / d logits · scale; fp32 work on `sub_rows` rows at a time, small
    enough to stay in cache."""
    losses = []
    for start in range(0, block.size(0), sub_rows):
        rows = slice(start, start + sub_rows)
        y = labels[rows, None]                               # (c, 1)
        z = block[rows].float()                              # (c, V)
        if bias is not None:
            z += bias
        lse = torch.logsumexp(z, 1, keepdim=True)            # (c, 1)
        # -log p(y) weighted 1 - ε, plus ε/V times -log p of every class.
        losses.append(lse.squeeze(1) - keep * z.gather(1, y).squeeze(1) - spread * z.sum(1))
        z -= lse
        z.exp_()                                             # softmax
        z.scatter_add_(1, y, torch.full_like(y, -keep, dtype=z.dtype))
        z -= spread
        z *= scale
        if bias_grad is not None:
            bias_grad[0] += z.sum(0)
        block[rows] = z
    return torch.cat(losses)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
                smoothing: float, block_rows: int, dtype: torch.dtype) -> Tensor:
        n, v = hidden.size(0), weight.size(0)
        h = hidden.to(dtype).contiguous()                   # (N, D)
        w = weight.to(dtype).contiguous()                   # (V, D)
        wt = w.t().contiguous()                             # (D, V)
        b = bias.float().contiguous() if bias is not None else None
        use_native = (h.device.type == "cpu" and dtype == torch.bfloat16
                      and native.library() is not None)
        threads = torch.get_num_threads() if use_native else 1
        bias_grad = (torch.zeros(threads, v, device=h.device) if b is not None
                     and ctx.needs_input_grad[2] else None)
        grad_hidden = torch.empty_like(h)                   # (N, D)
        # Summed block by block in the weight's own dtype when it is bf16 (bf16-pure training
        # keeps bf16 gradients anyway: no fp32 buffer, casts or transposes), else in fp32.
        grad_weight = torch.zeros(v, w.size(1), device=h.device,
                                  dtype=torch.bfloat16 if weight.dtype == dtype == torch.bfloat16
                                  else torch.float32)  # (V, D)
        keep, spread, scale = 1.0 - smoothing, smoothing / v, 1.0 / n
        losses = []
        # Block by block, so that logits, softmax and gradient stay in cache.
        for start in range(0, n, block_rows):
            rows = slice(start, start + block_rows)
            hb = h[rows]                                    # (c, D)
            z = hb @ wt                                     # (c, V) logits → gradient
            if use_native:
                losses.append(native.cross_entropy_grad_bf16(z, labels[rows], b, keep,
                                                             spread, scale, bias_grad))
            else:
                if int(labels[rows].min()) < 0 or int(labels[rows].max()) >= v:
                    raise IndexError(f"labels out of range 0..{v - 1}")
                # fp32 sub-blocks sized for a CPU's cache; a GPU takes the block whole.
                sub = 64 if z.device.type == "cpu" else z.size(0)
                losses.append(_block_grad(z, labels[rows], b, keep, spread, scale, bias_grad,
                                          sub))
            torch.mm(z, w, out=grad_hidden[rows])
            if grad_weight.dtype == z.dtype:
                grad_weight.addmm_(z.t(), hb)               # zᵀ hb, summed in place
            else:
                grad_weight += z.t() @ hb
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.bias_grad = bias_grad.sum(0) if bias_grad is not None else None
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return torch.cat(losses).sum() / n

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad.item() != 1.0:  # the usual case needs no pass over the gradients
            grad_hidden = grad_hidden * grad.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad.float()
        grad_bias = ctx.bias_grad * grad.float() if ctx.bias_grad is not None else None
        return (grad_hidden.to(hidden_dtype), grad_weight.to(weight_dtype), grad_bias,
                None, None, None, None)
