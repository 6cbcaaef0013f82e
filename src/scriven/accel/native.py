"""Native kernels (kernels.c), compiled on first use: int8 one-token-at-a-time generation,
top-k, and for training the cross-entropy gradient of bf16 logits, hashed dropout, layer norm,
attention over short sequences and (on AMX) bf16 weight gradients.

They need an x86-64 CPU with AVX-512 VNNI, Linux, and a C compiler (`$CC`, else `cc`); the
shared library is built once into a cache folder private to its owner and reused. Where any of
that is missing, or `SCRIVEN_NATIVE=0` is set, `library()` returns None and `unavailable()`
says why; callers then use plain PyTorch.

The generation kernels also come in a second build for CPUs with AVX2 and FMA but no AVX-512
(kernels_avx2.c: the same entry points and numbers): `generation_library()` is the full library
where it loads, else that one. `SCRIVEN_NATIVE=avx2` asks for the AVX2 build alone, as an AVX2
laptop runs it (the portable benchmark profile sets it).

Every binding checks what the C code assumes (device, dtype, contiguity, sizes) and raises
`ValueError` or `RuntimeError` naming what is wrong: the kernels trust their callers.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

NATIVE_ENV = "SCRIVEN_NATIVE"
AMX_ENV = "SCRIVEN_AMX"  # 0: no tile units (int8 batches on VNNI, weight gradients on PyTorch)
CACHE_ENV = "SCRIVEN_CACHE"


@dataclass(frozen=True)
class Build:
    """One library: its source, compiler flags, the CPU flags it needs and its entry points."""

    name: str
    source: Path
    flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    entry_points: tuple[str, ...]


_COMMON = ("-O3", "-fopenmp", "-fPIC", "-shared", "-Wall", "-Wextra")
GENERATION = ("scriven_linear_i8", "scriven_lstm_step_i8", "scriven_lstm_lm_step_i8",
              "scriven_sample_top_k", "scriven_sample_plain")
MAX_TOP_K = 64
LAYER_NORM_MAX_D = 1024  # LN_MAX_D in kernels.c
ATTENTION_MAX_HEAD_DIM = 256  # ATTN_MAX_D in kernels.c
ATTENTION_MAX_KEYS = 256  # ATTN_MAX_T in kernels.c

_p, _i, _i64, _u32, _f = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint32,
                          ctypes.c_float)
# Each entry point: (return type, [(argument name, C type), ...]), as declared in kernels.c.
SIGNATURES: dict[str, tuple[object, list[tuple[str, object]]]] = {
    "scriven_amx_init": (_i, []),
    "scriven_linear_i8": (_i, [("W", _p), ("rowsum", _p), ("wscale", _p), ("bias", _p), ("x", _p),
                               ("B", _i), ("K", _i), ("Kp", _i), ("N", _i), ("y", _p),
                               ("threads", _i)]),
    "scriven_lstm_step_i8": (_i, [("W", _p), ("rowsum", _p), ("wscale", _p), ("bias", _p),
                                  ("x", _p), ("h", _p), ("c", _p), ("B", _i), ("E", _i),
                                  ("Ep", _i), ("H", _i), ("Hp", _i), ("h_out", _p),
                                  ("c_out", _p), ("threads", _i)]),
    "scriven_lstm_lm_step_i8": (_i, [("L", _i), ("W", _p), ("rowsum", _p), ("wscale", _p),
                                     ("bias", _p), ("E", _p), ("H", _i), ("headW", _p),
                                     ("head_rowsum", _p), ("head_scale", _p), ("head_bias", _p),
                                     ("V", _i), ("table", _p), ("vocab", _i), ("ids", _p),
                                     ("h", _p), ("c", _p), ("B", _i), ("h_out", _p),
                                     ("c_out", _p), ("logits", _p), ("threads", _i)]),
    "scriven_sample_top_k": (None, [("x", _p), ("B", _i), ("V", _i), ("k", _p),
                                    ("temperature", _p), ("uniform", _p), ("ids", _p),
                                    ("probs", _p), ("threads", _i)]),
    "scriven_sample_plain": (_i, [("x", _p), ("B", _i), ("V", _i), ("uniform", _p),
                                  ("ids", _p), ("probs", _p), ("threads", _i)]),
    "scriven_xent_grad_bf16": (_i, [("z", _p), ("B", _i), ("V", _i), ("labels", _p),
                                    ("bias", _p), ("keep", _f), ("spread", _f), ("scale", _f),
                                    ("loss", _p), ("bias_grad", _p), ("scratch", _p),
                                    ("threads", _i)]),
    "scriven_dropout": (None, [("x", _p), ("out", _p), ("n", _i64), ("is_bf16", _i),
                               ("threshold", _u32), ("scale", _f), ("seed_a", _u32),
                               ("seed_b", _u32), ("threads", _i)]),
    "scriven_layer_norm_fwd": (None, [("x", _p), ("gamma", _p), ("beta", _p), ("y", _p),
                                      ("mean", _p), ("rstd", _p), ("N", _i64), ("D", _i),
                                      ("eps", _f), ("is_bf16", _i), ("threads", _i)]),
    "scriven_layer_norm_bwd": (None, [("x", _p), ("gamma", _p), ("mean", _p), ("rstd", _p),
                                      ("dy", _p), ("dx", _p), ("part", _p), ("N", _i64),
                                      ("D", _i), ("is_bf16", _i), ("threads", _i)]),
    "scriven_weight_grad_scratch": (_i64, [("M", _i), ("N", _i), ("threads", _i)]),
    "scriven_weight_grad_bf16": (None, [("a", _p), ("lda", _i64), ("b", _p), ("ldb", _i64),
                                        ("T", _i64), ("M", _i), ("N", _i), ("out", _p),
                                        ("scratch", _p), ("threads", _i)]),
    "scriven_attention_fwd": (_i, [("q", _p), ("k", _p), ("v", _p), ("out", _p), ("lse", _p),
                                   ("mask", _p), ("m_bs", _i64), ("m_rs", _i64), ("B", _i),
                                   ("H", _i), ("Tq", _i), ("Tk", _i), ("Dh", _i),
                                   ("is_bf16", _i), ("scale", _f), ("threshold", _u32),
                                   ("keep_scale", _f), ("seed_a", _u32), ("seed_b", _u32),
                                   ("threads", _i)]),
    "scriven_attention_bwd": (_i, [("q", _p), ("k", _p), ("v", _p), ("gout", _p), ("lse", _p),
                                   ("mask", _p), ("m_bs", _i64), ("m_rs", _i64), ("dq", _p),
                                   ("dk", _p), ("dv", _p), ("B", _i), ("H", _i), ("Tq", _i),
                                   ("Tk", _i), ("Dh", _i), ("is_bf16", _i), ("scale", _f),
                                   ("threshold", _u32), ("keep_scale", _f), ("seed_a", _u32),
                                   ("seed_b", _u32), ("threads", _i)]),
}


SHARED_HEADER = Path(__file__).with_name("kernels_shared.h")  # included by both sources
FULL = Build("avx512", Path(__file__).with_name("kernels.c"),
             ("-mavx512f", "-mavx512bw", "-mavx512vnni", "-mfma", *_COMMON),
             ("avx512f", "avx512bw", "avx512_vnni"), tuple(SIGNATURES))
AVX2 = Build("avx2", Path(__file__).with_name("kernels_avx2.c"), ("-mavx2", "-mfma", *_COMMON),
             ("avx2", "fma"), GENERATION)


def native_dir() -> Path:
    """Where the compiled library is kept: $SCRIVEN_CACHE/native, else the user cache folder."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured) / "native"
    import platformdirs

    return Path(platformdirs.user_cache_dir("scriven")) / "native"


def cpu_has(*features: str) -> bool:
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines()
                  if line.startswith("flags")), [])
    return all(f in flags for f in features)


def check_private(path: Path) -> None:
    """Refuse a folder or file that someone else could have written: loading a shared library
    runs its code, so it must come from a place only this user controls."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} is owned by another user (uid {info.st_uid})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PermissionError(f"{path} is writable by group or others "
                              f"(mode {stat.filemode(info.st_mode)})")


def _private_dir() -> Path:
    folder = native_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_private(folder)
    return folder


def library_path(compiler: str, spec: Build = FULL) -> Path:
    """The library built from this source with these flags by this compiler: a name for each,
    so that scriven versions sharing a cache never replace each other's library."""
    text = spec.source.read_bytes() + SHARED_HEADER.read_bytes()
    key = hashlib.sha256(text + " ".join([compiler, *spec.flags]).encode())
    prefix = "kernels" if spec is FULL else f"kernels-{spec.name}"
    return native_dir() / f"{prefix}-{key.hexdigest()[:16]}.so"


def build(compiler: str, target: Path, extra_flags: tuple[str, ...] = (),
          spec: Build = FULL) -> None:
    """Compile a build's source into `target`, atomically (a temporary file renamed into
    place)."""
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *spec.flags, *extra_flags, str(spec.source), "-o", tmp, "-lm"],
                       check=True, capture_output=True, text=True, timeout=180)
        os.chmod(tmp, 0o700)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _declare(lib: ctypes.CDLL, spec: Build) -> None:
    for name in spec.entry_points:
        restype, args = SIGNATURES[name]
        function = getattr(lib, name)  # AttributeError: a library from another source
        function.restype = restype
        function.argtypes = [ctype for _, ctype in args]


def _load(path: Path, spec: Build) -> ctypes.CDLL:
    check_private(path)
    lib = ctypes.CDLL(str(path))
    _declare(lib, spec)
    lib.build = spec.name
    return lib


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(compiler: str, spec: Build) -> ctypes.CDLL:
    """Load the cached library, building it first (under a lock, so concurrent processes build
    it once) when it is missing, or when it no longer matches the digest recorded when it was
    built (damaged, truncated or replaced)."""
    folder = _private_dir()
    target = library_path(compiler, spec)
    recorded = target.with_suffix(".sha256")
    with open(folder / (target.stem + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and recorded.exists():
            check_private(recorded)
            if recorded.read_text().strip() == _digest(target):
                return _load(target, spec)
        target.unlink(missing_ok=True)
        build(compiler, target, spec=spec)
        fd, tmp = tempfile.mkstemp(dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(_digest(target))
        os.replace(tmp, recorded)
        return _load(target, spec)


_why_unavailable: dict[str, list[str]] = {FULL.name: [], AVX2.name: []}


def unavailable() -> str | None:
    """Why the kernels do not load here, or None when they do."""
    return None if library() is not None else (_why_unavailable[FULL.name] or ["unknown"])[-1]


def _build_or_why(spec: Build, allowed: bool, refused: str) -> ctypes.CDLL | None:
    """The loaded build, or None with the reason kept for `unavailable`."""
    why = _why_unavailable[spec.name]
    if not allowed:
        why.append(refused)
        return None
    if not cpu_has(*spec.cpu_flags):
        why.append(f"this CPU lacks {'AVX-512 VNNI' if spec is FULL else 'AVX2 and FMA'}")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        why.append("no C compiler ($CC or cc)")
        return None
    try:
        return _open(compiler, spec)
    except (OSError, AttributeError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        why.append(f"the kernels could not be built or loaded: {detail}")
        return None


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be used here (see `unavailable`)."""
    setting = os.environ.get(NATIVE_ENV, "1")
    lib = _build_or_why(FULL, setting not in ("0", "avx2"), f"{NATIVE_ENV}={setting}")
    if lib is None:
        return None
    if os.environ.get(AMX_ENV, "1") != "0" and cpu_has("amx_tile", "amx_int8"):
        # Batches of 8 rows or more then run on the tile units; so do bf16 weight gradients.
        lib.amx_bf16 = bool(lib.scriven_amx_init()) and cpu_has("amx_bf16", "avx512_bf16")
    else:
        lib.amx_bf16 = False
    return lib


@functools.cache
def generation_library() -> ctypes.CDLL | None:
    """The library that runs int8 generation and top-k sampling here: the full one where it
    loads, else the AVX2 build, else None (`generation_unavailable` says why). Its `build` is
    "avx512" or "avx2"."""
    full = library()
    if full is not None:
        return full
    return _build_or_why(AVX2, os.environ.get(NATIVE_ENV, "1") != "0", f"{NATIVE_ENV}=0")


def generation_unavailable() -> str | None:
    """Why no generation kernels load here, or None when some do."""
    if generation_library() is not None:
        return None
    return (_why_unavailable[AVX2.name] or ["unknown"])[-1]


def amx_bf16() -> bool:
    """Whether bf16 weight gradients can run on the AMX kernel here."""
    lib = library()
    return lib is not None and lib.amx_bf16


def _lib() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f"scriven's native kernels are not available: {unavailable()}")
    return lib


def _generation_lib() -> ctypes.CDLL:
    lib = generation_library()
    if lib is None:
        raise RuntimeError("scriven's native generation kernels are not available: "
                           f"{generation_unavailable()}")
    return lib


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"native kernel: {what}")


def _cpu_tensor(t: Tensor, name: str, dtypes: tuple[torch.dtype, ...],
                contiguous: bool = True) -> None:
    # Checked first, described only on failure: this runs at every call of every binding.
    if t.device.type == "cpu" and t.dtype in dtypes and (not contiguous or t.is_contiguous()):
        return
    _require(t.device.type == "cpu", f"{name} must be on the CPU, not {t.device}")
    _require(t.dtype in dtypes, f"{name} must be {' or '.join(map(str, dtypes))}, not {t.dtype}")
    _require(False, f"{name} must be contiguous")


_FLOATS = (torch.float32, torch.bfloat16)


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
        from ..precision import quantize_int8

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


def linear_int8(packed: PackedInt8, x: Tensor) -> Tensor:
    """x (B, K) float32 -> x Wᵀ + b (B, N), through the int8 kernel."""
    x = x.float().contiguous()
    _cpu_tensor(x, "x", (torch.float32,))
    b, k = x.shape
    _require(k == sum(packed.segments), f"x has {k} columns, the weight {sum(packed.segments)}")
    y = torch.empty(b, packed.n)
    if _generation_lib().scriven_linear_i8(_ptr(packed.weight), _ptr(packed.rowsum), _ptr(packed.scale),
                                _ptr(packed.bias), _ptr(x), b, k, _padded(k), packed.n,
                                _ptr(y), torch.get_num_threads()):
        raise MemoryError("native linear_int8: out of memory")
    return y


def lstm_step_int8(packed: PackedInt8, x: Tensor, h: Tensor, c: Tensor, h_out: Tensor,
                   c_out: Tensor) -> None:
    """One LSTM layer step: x (B, E), h and c (B, H) -> h_out and c_out (B, H), written in place
    (contiguous float32 tensors)."""
    e, hidden = packed.segments
    b = x.size(0)
    for name, t, width in (("x", x, e), ("h", h, hidden), ("c", c, hidden),
                           ("h_out", h_out, hidden), ("c_out", c_out, hidden)):
        _cpu_tensor(t, name, (torch.float32,))
        _require(t.shape == (b, width), f"{name} must be ({b}, {width}), got {tuple(t.shape)}")
    if _generation_lib().scriven_lstm_step_i8(_ptr(packed.weight), _ptr(packed.rowsum), _ptr(packed.scale),
                                   _ptr(packed.bias), _ptr(x), _ptr(h), _ptr(c), b, e,
                                   _padded(e), hidden, _padded(hidden), _ptr(h_out), _ptr(c_out),
                                   torch.get_num_threads()):
        raise MemoryError("native lstm_step_int8: out of memory")


class LSTMStepInt8:
    """A whole step of an LSTM language model (layers without projections, then the output
    layer) through the int8 kernels, in one call."""

    def __init__(self, embedding: Tensor, layers: list[tuple[Tensor, Tensor, Tensor]],
                 head_weight: Tensor, head_bias: Tensor | None) -> None:
        """embedding (vocabulary, E); layers: (weight_ih (4H, E), weight_hh (4H, H), bias (4H,))
        of each layer; the output layer's weight (V, H) and bias."""
        self.lib = _generation_lib()
        self.embedding = embedding.detach().float().contiguous()
        self.hidden = layers[0][1].size(1)
        for w_ih, w_hh, bias in layers:
            _require(w_hh.shape == (4 * self.hidden, self.hidden) and w_ih.size(0) == w_hh.size(0)
                     and bias.shape == (4 * self.hidden,), "LSTM layers of one hidden size")
        _require(head_weight.size(1) == self.hidden, "the head must read the hidden state")
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
        return linear_int8(self.head, x)

    def __call__(self, ids: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids (B,) token ids, h and c (L, B, H) -> logits (B, V), new h and c."""
        ids, h, c = ids.long().contiguous(), h.float().contiguous(), c.float().contiguous()
        shape = (len(self.layers), ids.size(0), self.hidden)
        if not (ids.dim() == 1 and h.shape == shape and c.shape == shape):
            raise ValueError(f"native kernel: ids (B,) and states {shape} expected, got "
                             f"{tuple(ids.shape)}, {tuple(h.shape)}, {tuple(c.shape)}")
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


def _per_row(value: int | float | Tensor, rows: int, dtype: torch.dtype, name: str) -> Tensor:
    """One setting for all rows, or one per row (rows,), as a contiguous CPU tensor."""
    if not isinstance(value, Tensor):
        return torch.full((rows,), value, dtype=dtype)
    value = value.to("cpu", dtype).contiguous()
    _require(value.shape == (rows,), f"{name} must be one number or ({rows},), got "
                                     f"{tuple(value.shape)}")
    return value


def sample_top_k(logits: Tensor, k: int | Tensor, temperature: float | Tensor,
                 uniform: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k sampling of logits (B, V) float32 on the CPU, k ≤ MAX_TOP_K and `temperature` > 0
    each one for all rows or one per row (B,), with one uniform number in [0, 1) per row (B,):
    ids (B,) and their probabilities (B,), as `sampling.sample_rows` draws them from the same
    numbers."""
    logits, uniform = logits.contiguous(), uniform.float().contiguous()
    _cpu_tensor(logits, "logits", (torch.float32,))
    _require(logits.dim() == 2, f"logits must be (B, V), got {tuple(logits.shape)}")
    b, v = logits.shape
    ks = _per_row(k, b, torch.int32, "k")
    ts = _per_row(temperature, b, torch.float32, "temperature")
    top = min(MAX_TOP_K, v)
    if b and not (int(ks.min()) >= 1 and int(ks.max()) <= top):
        _require(False, f"top-k takes 1 <= k <= {top}, got k from {int(ks.min())} to "
                        f"{int(ks.max())}")
    if not (bool((ts > 0).all()) and uniform.shape == (b,)):
        raise ValueError(f"native kernel: temperature must be > 0 (got {temperature}) and one "
                         f"uniform number given per row (got {tuple(uniform.shape)})")
    ids, probs = torch.empty(b, dtype=torch.long), torch.empty(b)
    _generation_lib().scriven_sample_top_k(_ptr(logits), b, v, _ptr(ks), _ptr(ts), _ptr(uniform),
                                           _ptr(ids), _ptr(probs), torch.get_num_threads())
    return ids, probs


def sample_plain(logits: Tensor, uniform: Tensor) -> tuple[Tensor, Tensor]:
    """Sampling from the whole softmax of logits (B, V) float32 on the CPU (already divided by
    the temperature), with one uniform number in [0, 1) per row (B,): ids (B,) and their
    probabilities (B,), by the rule `sampling` draws plain samples with (equal picks but where u
    falls within rounding of a boundary between two tokens)."""
    logits, uniform = logits.contiguous(), uniform.float().contiguous()
    _cpu_tensor(logits, "logits", (torch.float32,))
    _require(logits.dim() == 2 and logits.size(1) > 0,
             f"logits must be (B, V) with V > 0, got {tuple(logits.shape)}")
    b, v = logits.shape
    _require(uniform.shape == (b,), f"one uniform number per row ({b},) expected, got "
                                    f"{tuple(uniform.shape)}")
    ids, probs = torch.empty(b, dtype=torch.long), torch.empty(b)
    if _generation_lib().scriven_sample_plain(_ptr(logits), b, v, _ptr(uniform),
                                              _ptr(ids), _ptr(probs), torch.get_num_threads()):
        raise MemoryError("native sampler: out of memory")
    return ids, probs


def cross_entropy_grad_bf16(logits: Tensor, labels: Tensor, bias: Tensor | None,
                            keep: float, spread: float, scale: float,
                            bias_grad: Tensor | None) -> Tensor:
    """Label-smoothed cross-entropy of a block of bf16 logits (B, V) (+ bias (V,) float32),
    overwritten in place with its gradient times `scale` (see kernels.c): the loss of each row
    (B,). `bias_grad` (threads, V) float32 collects the rows' gradients, one row per thread."""
    _cpu_tensor(logits, "logits", (torch.bfloat16,))
    b, v = logits.shape
    labels = labels.contiguous()
    _cpu_tensor(labels, "labels", (torch.int64,))
    _require(labels.shape == (b,), f"labels must be ({b},), got {tuple(labels.shape)}")
    threads = torch.get_num_threads()
    if bias is not None:
        _cpu_tensor(bias, "bias", (torch.float32,))
        _require(bias.shape == (v,), f"bias must be ({v},), got {tuple(bias.shape)}")
    if bias_grad is not None:
        _cpu_tensor(bias_grad, "bias_grad", (torch.float32,))
        _require(bias_grad.shape == (threads, v), f"bias_grad must be ({threads}, {v})")
    loss = torch.empty(b)
    scratch = torch.empty(threads, v)  # fp32 exponentials of one row per thread
    bad = _lib().scriven_xent_grad_bf16(_ptr(logits), b, v, _ptr(labels),
                                        _ptr(bias) if bias is not None else None, keep, spread,
                                        scale, _ptr(loss),
                                        _ptr(bias_grad) if bias_grad is not None else None,
                                        _ptr(scratch), threads)
    if bad:
        raise IndexError(f"label {int(labels[bad - 1])} out of range 0..{v - 1}")
    return loss


def dropout(x: Tensor, threshold: int, scale: float, seed_a: int, seed_b: int) -> Tensor:
    """Dropout of a contiguous bf16 or float32 CPU tensor with the counter-based mask of
    kernels.c (see dropout.py, which computes the same mask with PyTorch ops)."""
    _cpu_tensor(x, "x", _FLOATS)
    _require(x.numel() < 2**32, "the mask hash counts elements in 32 bits")
    out = torch.empty_like(x)
    _lib().scriven_dropout(_ptr(x), _ptr(out), x.numel(), int(x.dtype == torch.bfloat16),
                           threshold, scale, seed_a, seed_b, torch.get_num_threads())
    return out


def _check_layer_norm(x: Tensor, weight: Tensor) -> None:
    _cpu_tensor(x, "x", _FLOATS)
    _cpu_tensor(weight, "weight", (x.dtype,))
    _require(x.dim() == 2, f"x must be (N, D), got {tuple(x.shape)}")
    d = x.size(1)
    _require(0 < d <= LAYER_NORM_MAX_D and d % 16 == 0,
             f"D must be a multiple of 16 up to {LAYER_NORM_MAX_D}, got {d}")
    _require(weight.shape == (d,), f"weight must be ({d},), got {tuple(weight.shape)}")


def layer_norm_forward(x: Tensor, weight: Tensor, bias: Tensor,
                       eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Layer norm of the rows of contiguous x (N, D), bf16 or float32 like weight and bias (D,):
    y (N, D) and each row's mean and 1 / std (N,) float32 for the backward pass."""
    _check_layer_norm(x, weight)
    _cpu_tensor(bias, "bias", (x.dtype,))
    _require(bias.shape == weight.shape, "bias and weight must match")
    n, d = x.shape
    y, mean, rstd = torch.empty_like(x), torch.empty(n), torch.empty(n)
    _lib().scriven_layer_norm_fwd(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), _ptr(mean),
                                  _ptr(rstd), n, d, eps, int(x.dtype == torch.bfloat16),
                                  torch.get_num_threads())
    return y, mean, rstd


def layer_norm_backward(x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `layer_norm_forward` for the output gradient grad (N, D): those of x (N, D),
    weight and bias (D,) (float32, summed over rows)."""
    _check_layer_norm(x, weight)
    n, d = x.shape
    grad = grad.to(x.dtype).contiguous()
    _require(grad.shape == x.shape and mean.shape == rstd.shape == (n,),
             "grad must match x, and mean and rstd have one value per row")
    threads = torch.get_num_threads()
    dx, part = torch.empty_like(x), torch.empty(threads, 2, d)
    _lib().scriven_layer_norm_bwd(_ptr(x), _ptr(weight), _ptr(mean), _ptr(rstd), _ptr(grad),
                                  _ptr(dx), _ptr(part), n, d, int(x.dtype == torch.bfloat16),
                                  threads)
    sums = part.sum(0)
    return dx, sums[0], sums[1]


def weight_grad_bf16(grad: Tensor, x: Tensor) -> Tensor:
    """gradᵀ · x (M, N) in bf16, for grad (T, M) and x (T, N) bf16 with M, N multiples of 32: a
    linear layer's weight gradient, on the AMX tile units (only where `amx_bf16()`). Rows may
    be strided (a column slice is read in place)."""
    _cpu_tensor(grad, "grad", (torch.bfloat16,), contiguous=False)
    _cpu_tensor(x, "x", (torch.bfloat16,), contiguous=False)
    _require(grad.dim() == 2 and x.dim() == 2 and grad.size(0) == x.size(0),
             f"grad (T, M) and x (T, N) expected, got {tuple(grad.shape)} and {tuple(x.shape)}")
    (t, m), n = grad.shape, x.size(1)
    _require(m % 32 == 0 and n % 32 == 0, f"M and N must be multiples of 32, got {m} and {n}")
    lib = _lib()
    _require(lib.amx_bf16, "bf16 weight gradients need AMX")
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


def _check_attention(q: Tensor, k: Tensor, v: Tensor, a: AttentionArgs) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _cpu_tensor(t, name, (q.dtype,) if name != "q" else _FLOATS)
        _require(t.dim() == 3, f"{name} must be (B, T, H·Dh), got {tuple(t.shape)}")
    b, tq, d = q.shape
    tk = k.size(1)
    _require(k.shape == v.shape == (b, tk, d), "k and v must be (B, Tk, H·Dh) like q")
    _require(a.heads > 0 and d % a.heads == 0, f"{a.heads} heads do not divide {d}")
    dh = d // a.heads
    _require(dh % 16 == 0 and dh <= ATTENTION_MAX_HEAD_DIM,
             f"head size must be a multiple of 16 up to {ATTENTION_MAX_HEAD_DIM}, got {dh}")
    _require(0 < tk <= ATTENTION_MAX_KEYS, f"1 to {ATTENTION_MAX_KEYS} keys, got {tk}")
    if a.mask is not None:
        m = a.mask
        _cpu_tensor(m, "mask", (torch.bool, torch.uint8), contiguous=False)
        _require(m.dim() == 3 and m.size(0) in (1, b) and m.size(1) in (1, tq)
                 and m.size(2) == tk and m.stride(2) == 1,
                 f"mask must be (B|1, Tq|1, Tk) with unit key stride, got {tuple(m.shape)}")


def attention_forward(q: Tensor, k: Tensor, v: Tensor, a: AttentionArgs) -> tuple[Tensor, Tensor]:
    """q (B, Tq, H·Dh), k and v (B, Tk, H·Dh), contiguous bf16 or float32 → output (B, Tq, H·Dh)
    and each query row's log-sum-exp (B, H, Tq) float32 (see kernels.c)."""
    _check_attention(q, k, v, a)
    b, tq, d = q.shape
    tk = k.size(1)
    out = torch.empty_like(q)
    lse = torch.empty(b, a.heads, tq)
    mask, m_bs, m_rs = a.mask_args()
    err = _lib().scriven_attention_fwd(_ptr(q), _ptr(k), _ptr(v), _ptr(out), _ptr(lse), mask,
                                       m_bs, m_rs, b, a.heads, tq, tk, d // a.heads,
                                       int(q.dtype == torch.bfloat16), a.scale, a.threshold,
                                       a.keep_scale, a.seed_a, a.seed_b, torch.get_num_threads())
    if err:
        raise RuntimeError(f"native attention cannot take Tk={tk}, head size {d // a.heads}")
    return out, lse


def attention_backward(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, grad_out: Tensor,
                       a: AttentionArgs) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of `attention_forward` for grad_out (B, Tq, H·Dh)."""
    _check_attention(q, k, v, a)
    b, tq, d = q.shape
    tk = k.size(1)
    grad_out = grad_out.to(q.dtype).contiguous()
    _require(grad_out.shape == q.shape and lse.shape == (b, a.heads, tq),
             "grad_out must match q and lse be (B, H, Tq)")
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask, m_bs, m_rs = a.mask_args()
    err = _lib().scriven_attention_bwd(_ptr(q), _ptr(k), _ptr(v), _ptr(grad_out), _ptr(lse),
                                       mask, m_bs, m_rs, _ptr(dq), _ptr(dk), _ptr(dv), b, a.heads,
                                       tq, tk, d // a.heads, int(q.dtype == torch.bfloat16),
                                       a.scale, a.threshold, a.keep_scale, a.seed_a, a.seed_b,
                                       torch.get_num_threads())
    if err:
        raise RuntimeError(f"native attention backward failed (code {err})")
    return dq, dk, dv
