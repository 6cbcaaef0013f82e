"""Native kernels (kernels.c), compiled on first use: int8 one-token-at-a-time generation,
top-k, and for training the cross-entropy gradient of bf16 logits, hashed dropout, layer norm,
attention over short sequences and (on AMX) bf16 weight gradients.

They need an x86-64 CPU with AVX-512 VNNI, Linux, and a C compiler (`$CC`, else `cc`); the
shared library is built once into the cache folder and reused. Where any of that is missing,
or `SCRIVEN_NATIVE=0` is set, `library()` returns None and callers use PyTorch's kernels: the
same results up to rounding (the int8 kernels also round each layer's input to 8 bits, where
PyTorch's int8 path keeps it in bf16).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .data import CACHE_ENV

NATIVE_ENV = "SCRIVEN_NATIVE"
AMX_ENV = "SCRIVEN_AMX"  # 0: no tile units (int8 batches on VNNI, weight gradients on PyTorch)
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma", "-fopenmp", "-fPIC", "-shared"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512_vnni")
MAX_TOP_K = 64


def _native_dir() -> Path:
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured) / "native"
    import platformdirs

    return Path(platformdirs.user_cache_dir("scriven")) / "native"


def _cpu_has(*features: str) -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    return all(f in flags for f in features)


def _build(compiler: str) -> Path:
    """Compile kernels.c into the cache (atomically: a temp file renamed into place)."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    target = _native_dir() / f"kernels-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
        for stale in target.parent.glob("kernels-*.so"):  # builds of earlier sources
            if stale != target:
                stale.unlink(missing_ok=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used here (see the module docstring)."""
    if os.environ.get(NATIVE_ENV, "1") == "0" or not _cpu_has(*_CPU_FLAGS):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        warnings.warn(f"scriven: native kernels unavailable, using PyTorch's ({detail})", stacklevel=2)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.scriven_linear_i8.argtypes = [p, p, p, p, p, i, i, i, i, p, i]
    lib.scriven_lstm_step_i8.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, p, p, i]
    lib.scriven_lstm_lm_step_i8.argtypes = [i, p, p, p, p, p, i, p, p, p, p, i, p, i, p, p, p, i,
                                            p, p, p, i]
    lib.scriven_topk.argtypes = [p, i, i, i, p, p, i]
    lib.scriven_topk.restype = None
    lib.scriven_amx_init.argtypes = []
    if os.environ.get(AMX_ENV, "1") != "0" and _cpu_has("amx_tile", "amx_int8"):
        # Batches of 8 rows or more then run on the tile units; so do bf16 weight gradients.
        lib.amx_bf16 = bool(lib.scriven_amx_init()) and _cpu_has("amx_bf16", "avx512_bf16")
    else:
        lib.amx_bf16 = False
    lib.scriven_sample_top_k.argtypes = [p, i, i, i, ctypes.c_float, p, p, p, i]
    lib.scriven_sample_top_k.restype = None
    lib.scriven_xent_grad_bf16.argtypes = [p, i, i, p, p, ctypes.c_float, ctypes.c_float,
                                           ctypes.c_float, p, p, p, i]
    u32, i64, f = ctypes.c_uint32, ctypes.c_int64, ctypes.c_float
    lib.scriven_dropout.argtypes = [p, p, p, i64, i, i, u32, f, u32, u32, i]
    lib.scriven_dropout.restype = None
    lib.scriven_relu_dropout_bwd.argtypes = [p, p, p, i64, i, f, i]
    lib.scriven_relu_dropout_bwd.restype = None
    lib.scriven_layer_norm_fwd.argtypes = [p, p, p, p, p, p, i64, i, f, i, i]
    lib.scriven_layer_norm_fwd.restype = None
    lib.scriven_layer_norm_bwd.argtypes = [p, p, p, p, p, p, p, i64, i, i, i]
    lib.scriven_layer_norm_bwd.restype = None
    lib.scriven_weight_grad_scratch.argtypes = [i, i, i]
    lib.scriven_weight_grad_scratch.restype = i64
    lib.scriven_weight_grad_bf16.argtypes = [p, i64, p, i64, i64, i, i, p, p, i]
    lib.scriven_weight_grad_bf16.restype = None
    lib.scriven_attention_fwd.argtypes = [p, p, p, p, p, p, i64, i64, i, i, i, i, i, i, f, u32, f,
                                          u32, u32, i]
    lib.scriven_attention_bwd.argtypes = [p, p, p, p, p, p, i64, i64, p, p, p, i, i, i, i, i, i, f,
                                          u32, f, u32, u32, i]
    return lib


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


def _padded(n: int) -> int:
    return -(-n // 64) * 64


@dataclass(frozen=True)
class PackedInt8:
    """A weight matrix (N, K) in the kernels' int8 layout (see kernels.c), its columns in one or
    two segments (the input and the hidden state of an LSTM layer)."""

    weight: Tensor     # (Np/16, Kp/4, 16, 4) int8
    rowsum: Tensor     # (2, Np) int32
    scale: Tensor      # (Np,) float32
    bias: Tensor       # (Np,) float32
    n: int
    segments: tuple[int, ...]  # real columns per segment

    @classmethod
    def pack(cls, weight: Tensor, bias: Tensor | None, segments: tuple[int, ...]) -> PackedInt8:
        """Quantize per output row (absmax / 127, as `precision.quantize_int8`) and lay out."""
        from .precision import quantize_int8

        q, scale = quantize_int8(weight.detach().float().cpu())             # (N, K), (N,)
        n = q.size(0)
        np_ = -(-n // 64) * 64
        parts, sums, start = [], [], 0
        for width in segments:
            part = torch.zeros(np_, _padded(width), dtype=torch.int8)
            part[:n, :width] = q[:, start : start + width]
            parts.append(part)
            sums.append(part.sum(1, dtype=torch.int32))
            start += width
        if len(sums) == 1:
            sums.append(torch.zeros_like(sums[0]))
        w = torch.cat(parts, 1)                                              # (Np, Kp)
        blocked = w.view(np_ // 16, 16, w.size(1) // 4, 4).permute(0, 2, 1, 3).contiguous()

        def padded(v: Tensor | None) -> Tensor:
            out = torch.zeros(np_)
            if v is not None:
                out[:n] = v.detach().float().cpu()
            return out

        return cls(blocked, torch.stack(sums).contiguous(), padded(scale), padded(bias), n, segments)


def linear_int8(lib: ctypes.CDLL, packed: PackedInt8, x: Tensor) -> Tensor:
    """x (B, K) float32 -> x Wᵀ + b (B, N), through the int8 kernel."""
    x = x.contiguous()
    b, k = x.shape
    y = torch.empty(b, packed.n)
    if lib.scriven_linear_i8(_ptr(packed.weight), _ptr(packed.rowsum), _ptr(packed.scale),
                             _ptr(packed.bias), _ptr(x), b, k, _padded(k), packed.n,
                             _ptr(y), torch.get_num_threads()):
        raise MemoryError("native linear_int8: out of memory")
    return y


def lstm_step_int8(lib: ctypes.CDLL, packed: PackedInt8, x: Tensor, h: Tensor, c: Tensor,
                   h_out: Tensor, c_out: Tensor) -> None:
    """One LSTM layer step: x (B, E), h and c (B, H) -> h_out and c_out (B, H), written in place
    (contiguous float32 tensors, or rows of them)."""
    e, hidden = packed.segments
    if lib.scriven_lstm_step_i8(_ptr(packed.weight), _ptr(packed.rowsum), _ptr(packed.scale),
                                _ptr(packed.bias), _ptr(x), _ptr(h), _ptr(c), x.size(0), e,
                                _padded(e), hidden, _padded(hidden), _ptr(h_out), _ptr(c_out),
                                torch.get_num_threads()):
        raise MemoryError("native lstm_step_int8: out of memory")


class LSTMStepInt8:
    """A whole step of an LSTM language model (layers without projections, then the output
    layer) through the int8 kernels, in one call."""

    def __init__(self, lib: ctypes.CDLL, embedding: Tensor, layers: list[tuple[Tensor, Tensor, Tensor]],
                 head_weight: Tensor, head_bias: Tensor | None) -> None:
        """embedding (vocabulary, E); layers: (weight_ih (4H, E), weight_hh (4H, H), bias (4H,))
        of each layer; the output layer's weight (V, H) and bias."""
        self.lib = lib
        self.embedding = embedding.detach().float().contiguous()
        self.hidden = layers[0][1].size(1)
        self.layers = [PackedInt8.pack(torch.cat([w_ih, w_hh], 1), bias, (w_ih.size(1), w_hh.size(1)))
                       for w_ih, w_hh, bias in layers]
        self.head = PackedInt8.pack(head_weight, head_bias, (head_weight.size(1),))

        def pointers(name: str) -> ctypes.Array:
            return (ctypes.c_void_p * len(self.layers))(*(getattr(p, name).data_ptr() for p in self.layers))

        self._args = [len(self.layers), pointers("weight"), pointers("rowsum"), pointers("scale"),
                      pointers("bias"), (ctypes.c_int * len(layers))(*(p.segments[0] for p in self.layers)),
                      self.hidden, *(_ptr(t) for t in (self.head.weight, self.head.rowsum, self.head.scale,
                                                      self.head.bias)), self.head.n,
                      _ptr(self.embedding), self.embedding.size(0)]

    def head_logits(self, x: Tensor) -> Tensor:
        """The output layer alone (for the last position of a prompt): x (B, H) -> (B, V)."""
        return linear_int8(self.lib, self.head, x.float())

    def __call__(self, ids: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids (B,) token ids, h and c (L, B, H) -> logits (B, V), new h and c."""
        ids, h, c = ids.long().contiguous(), h.float().contiguous(), c.float().contiguous()
        h_out, c_out = torch.empty_like(h), torch.empty_like(c)
        logits = torch.empty(ids.size(0), self.head.n)
        status = self.lib.scriven_lstm_lm_step_i8(*self._args, _ptr(ids), _ptr(h), _ptr(c),
                                                  ids.size(0), _ptr(h_out), _ptr(c_out),
                                                  _ptr(logits), torch.get_num_threads())
        if status == 2:
            raise IndexError(f"token id out of range 0..{self.embedding.size(0) - 1}")
        if status:
            raise MemoryError("native LSTM step: out of memory")
        return logits, h_out, c_out


def top_k(lib: ctypes.CDLL, logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """torch.topk(logits (B, V) float32 on the CPU, k) for k ≤ MAX_TOP_K, in one pass per row."""
    logits = logits.contiguous()
    b, v = logits.shape
    values, indices = torch.empty(b, k), torch.empty(b, k, dtype=torch.long)
    lib.scriven_topk(_ptr(logits), b, v, k, _ptr(values), _ptr(indices), torch.get_num_threads())
    return values, indices


def sample_top_k(lib: ctypes.CDLL, logits: Tensor, k: int, temperature: float,
                 uniform: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k sampling of logits (B, V) float32 on the CPU at `temperature` > 0, k ≤ MAX_TOP_K,
    with one uniform number in [0, 1) per row (B,): ids (B,) and their probabilities (B,), as
    `sampling.sample_with_probability` draws them from the same numbers."""
    if not 0 < k <= MAX_TOP_K:
        raise ValueError(f"native top-k sampling takes 1 <= k <= {MAX_TOP_K}, got {k}")
    logits, uniform = logits.contiguous(), uniform.float().contiguous()
    b, v = logits.shape
    ids, probs = torch.empty(b, dtype=torch.long), torch.empty(b)
    lib.scriven_sample_top_k(_ptr(logits), b, v, k, temperature, _ptr(uniform), _ptr(ids),
                             _ptr(probs), torch.get_num_threads())
    return ids, probs


def cross_entropy_grad_bf16(lib: ctypes.CDLL, logits: Tensor, labels: Tensor, bias: Tensor | None,
                            keep: float, spread: float, scale: float,
                            bias_grad: Tensor | None) -> Tensor:
    """Label-smoothed cross-entropy of a block of bf16 logits (B, V) (+ bias (V,) float32),
    overwritten in place with its gradient times `scale` (see kernels.c): the loss of each row
    (B,). `bias_grad` (threads, V) float32 collects the rows' gradients, one row per thread."""
    assert logits.dtype == torch.bfloat16 and logits.is_contiguous()
    b, v = logits.shape
    labels = labels.contiguous()
    loss = torch.empty(b)
    threads = torch.get_num_threads()
    assert bias_grad is None or tuple(bias_grad.shape) == (threads, v)
    scratch = torch.empty(threads, v)  # fp32 exponentials of one row per thread
    bad = lib.scriven_xent_grad_bf16(_ptr(logits), b, v, _ptr(labels),
                                     _ptr(bias) if bias is not None else None, keep, spread, scale,
                                     _ptr(loss), _ptr(bias_grad) if bias_grad is not None else None,
                                     _ptr(scratch), threads)
    if bad:
        raise IndexError(f"label {int(labels[bad - 1])} out of range 0..{v - 1}")
    return loss


def dropout(lib: ctypes.CDLL, x: Tensor, threshold: int, scale: float, seed_a: int,
            seed_b: int, residual: Tensor | None = None, relu: bool = False) -> Tensor:
    """`residual + dropout(relu(x) if relu else x)` (no residual when None) for a contiguous
    bf16 or float32 CPU tensor, with the counter-based mask of kernels.c (see dropout.py, which
    computes the same mask without these kernels); the sum is rounded once."""
    assert x.dtype in (torch.bfloat16, torch.float32) and x.is_contiguous()
    assert residual is None or (residual.dtype == x.dtype and residual.shape == x.shape
                                and residual.is_contiguous())
    out = torch.empty_like(x)
    lib.scriven_dropout(_ptr(x), _ptr(residual) if residual is not None else None, _ptr(out),
                        x.numel(), int(x.dtype == torch.bfloat16), int(relu), threshold, scale,
                        seed_a, seed_b, torch.get_num_threads())
    return out


def relu_dropout_backward(lib: ctypes.CDLL, grad: Tensor, y: Tensor, scale: float) -> Tensor:
    """Gradient of relu-then-dropout from its output y: grad · scale where y > 0, else 0."""
    assert grad.dtype == y.dtype and grad.shape == y.shape and y.is_contiguous()
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    lib.scriven_relu_dropout_bwd(_ptr(grad), _ptr(y), _ptr(out), grad.numel(),
                                 int(grad.dtype == torch.bfloat16), scale,
                                 torch.get_num_threads())
    return out


LAYER_NORM_MAX_D = 1024  # LN_MAX_D in kernels.c


def layer_norm_forward(lib: ctypes.CDLL, x: Tensor, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Layer norm of the rows of contiguous x (N, D), bf16 or float32 like weight and bias (D,):
    y (N, D) and each row's mean and 1 / std (N,) float32 for the backward pass."""
    n, d = x.shape
    y, mean, rstd = torch.empty_like(x), torch.empty(n), torch.empty(n)
    lib.scriven_layer_norm_fwd(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), _ptr(mean),
                               _ptr(rstd), n, d, eps, int(x.dtype == torch.bfloat16),
                               torch.get_num_threads())
    return y, mean, rstd


def layer_norm_backward(lib: ctypes.CDLL, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `layer_norm_forward` for the output gradient grad (N, D): those of x (N, D),
    weight and bias (D,) (float32, summed over rows)."""
    n, d = x.shape
    grad = grad.contiguous()
    threads = torch.get_num_threads()
    dx, part = torch.empty_like(x), torch.empty(threads, 2, d)
    lib.scriven_layer_norm_bwd(_ptr(x), _ptr(weight), _ptr(mean), _ptr(rstd), _ptr(grad),
                               _ptr(dx), _ptr(part), n, d, int(x.dtype == torch.bfloat16),
                               threads)
    sums = part.sum(0)
    return dx, sums[0], sums[1]


def weight_grad_bf16(lib: ctypes.CDLL, grad: Tensor, x: Tensor) -> Tensor:
    """gradᵀ · x (M, N) in bf16, for grad (T, M) and x (T, N) bf16 with M, N multiples of 32: a
    linear layer's weight gradient, on the AMX tile units (only where `lib.amx_bf16`). Rows may
    be strided (a column slice is read in place)."""
    (t, m), n = grad.shape, x.size(1)
    assert m % 32 == 0 and n % 32 == 0
    if grad.stride(1) != 1:
        grad = grad.contiguous()
    if x.stride(1) != 1:
        x = x.contiguous()
    if t == 0:
        return torch.zeros(m, n, dtype=torch.bfloat16)
    threads = torch.get_num_threads()
    out = torch.empty(m, n, dtype=torch.bfloat16)
    scratch = torch.empty(lib.scriven_weight_grad_scratch(m, n, threads) + 64, dtype=torch.uint8)
    aligned = _ptr(scratch) + (-_ptr(scratch)) % 64
    lib.scriven_weight_grad_bf16(_ptr(grad), grad.stride(0), _ptr(x), x.stride(0), t, m, n,
                                 _ptr(out), aligned, threads)
    return out


ATTENTION_MAX_HEAD_DIM = 256  # ATTN_MAX_D in kernels.c (keys: up to ATTN_MAX_T, also 256)


@dataclass(frozen=True)
class AttentionArgs:
    """What the two attention kernels share: heads, the mask (uint8 (B|1, Tq|1, Tk) with its two
    leading strides, or None), and the dropout draw (threshold 0: no dropout)."""

    heads: int
    mask: Tensor | None
    scale: float
    threshold: int
    keep_scale: float
    seed_a: int
    seed_b: int

    def mask_args(self) -> tuple[int | None, int, int]:
        if self.mask is None:
            return None, 0, 0
        m = self.mask
        return (_ptr(m), m.stride(0) if m.size(0) > 1 else 0,
                m.stride(1) if m.size(1) > 1 else 0)


def attention_forward(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor,
                      a: AttentionArgs) -> tuple[Tensor, Tensor]:
    """q (B, Tq, H·Dh), k and v (B, Tk, H·Dh), contiguous bf16 or float32 → output (B, Tq, H·Dh)
    and each query row's log-sum-exp (B, H, Tq) float32 (see kernels.c)."""
    b, tq, d = q.shape
    tk = k.size(1)
    out = torch.empty_like(q)
    lse = torch.empty(b, a.heads, tq)
    mask, m_bs, m_rs = a.mask_args()
    err = lib.scriven_attention_fwd(_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), mask, m_bs,
                                    m_rs, b, a.heads, tq, tk, d // a.heads,
                                    int(q.dtype == torch.bfloat16), a.scale, a.threshold,
                                    a.keep_scale, a.seed_a, a.seed_b, torch.get_num_threads())
    if err:
        raise RuntimeError(f"native attention cannot take Tk={tk}, head size {d // a.heads}")
    return out, lse


def attention_backward(lib: ctypes.CDLL, q: Tensor, k: Tensor, v: Tensor, lse: Tensor,
                       grad_out: Tensor, a: AttentionArgs) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `attention_forward` for grad_out (B, Tq, H·Dh)."""
    b, tq, d = q.shape
    tk = k.size(1)
    grad_out = grad_out.to(q.dtype).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, m_bs, m_rs = a.mask_args()
    err = lib.scriven_attention_bwd(_ptr(q), _ptr(k), _ptr(v), _ptr(grad_out), _ptr(lse), mask,
                                    m_bs, m_rs, _ptr(dq), _ptr(dk), _ptr(dv), b, a.heads, tq, tk,
                                    d // a.heads, int(q.dtype == torch.bfloat16), a.scale,
                                    a.threshold, a.keep_scale, a.seed_a, a.seed_b,
                                    torch.get_num_threads())
    if err:
        raise RuntimeError(f"native attention backward failed (code {err})")
    return dq, dk, dv
