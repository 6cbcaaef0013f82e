"""Where work runs and in what precision: device resolution, the training precision policy, and
the process settings that suit CPU training. Decided once, at the boundary, from the machine at
hand (measured, where a CPU flag would not say enough).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import ScrivenError

# Precision of training steps. bf16 / fp16: autocast (fp32 weights, matmuls in half precision).
# bf16-pure: the forward and backward pass run on a bf16 copy of the model (no casts at every
# layer); the optimizer updates fp32 master weights, copied back to bf16 after each step.
# auto: the fastest measured on this hardware (see `training_precision`).
AMP_MODES = ("auto", "bf16", "bf16-pure", "fp16", "off")


@dataclass
class Distributed:
    """Rank and world size, read once from torchrun's environment."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(name: str, dist: Distributed | None = None) -> torch.device:
    """"auto", "cpu", "cuda" or "cuda:N" as a device with an index where it has one; under
    torchrun, "cuda" is this process's own GPU. Asking for a GPU that is not there is an error."""
    if not isinstance(name, str) or not (name in ("auto", "cpu") or name.startswith("cuda")):
        raise ScrivenError(f"device: must be auto, cpu or cuda[:N], got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ScrivenError(f"device {name!r} was asked for, but no CUDA GPU is available")
        if name == "cuda" and dist is not None and dist.world > 1:  # one GPU per process
            gpus = torch.cuda.device_count()
            if dist.local_rank >= gpus:
                raise ScrivenError(
                    f"torchrun process {dist.local_rank} has no GPU of its own: this machine has "
                    f"{gpus}; start at most {gpus} per machine (--nproc-per-node) or train with "
                    "--device cpu")
            name = f"cuda:{dist.local_rank}"
        elif name == "cuda":  # an index, which torch.cuda.set_device needs
            name = f"cuda:{torch.cuda.current_device()}"
        index = torch.device(name).index
        if index is not None and index >= torch.cuda.device_count():
            raise ScrivenError(f"device {name!r} was asked for, but this machine has "
                               f"{torch.cuda.device_count()} GPU(s): cuda:0 to "
                               f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device(name)


def training_precision(amp: str, device: torch.device, pure_bf16: bool) -> str:
    """Resolve `auto` for a task: where bf16 matmuls are fast on a CPU, `bf16-pure` if the task
    allows it (it saves autocast's casts of weights and activations at every layer); otherwise
    `auto` stays autocast (see `autocast_dtype`); explicit modes are kept."""
    if amp != "auto":
        return amp
    if device.type == "cpu" and pure_bf16 and autocast_dtype("auto", device) is torch.bfloat16:
        return "bf16-pure"
    return "auto"


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for full fp32. `auto` takes bf16 where the hardware runs it
    fast (CUDA with bf16; a CPU where `bf16_matmuls_fast` measures it), else fp32 on a CPU.
    `bf16-pure` autocasts in bf16 where it runs the fp32 model (validation)."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp in ("bf16", "bf16-pure"):
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if bf16_matmuls_fast() else None


@functools.cache
def bf16_matmuls_fast() -> bool:
    """Whether bf16 matmuls run clearly faster than fp32 on this CPU, measured (a few
    milliseconds, once per process): CPUs with AVX-512 BF16 or AMX run them natively, others
    emulate them more slowly than fp32, and limits such as ONEDNN_MAX_CPU_ISA change which is
    which."""
    if not torch.backends.mkldnn.is_available():
        return False
    a = torch.randn(256, 256)

    def seconds(x: Tensor) -> float:
        torch.mm(x, x)  # warm-up: oneDNN builds its kernel for the shape
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(x, x)
            best = min(best, time.perf_counter() - start)
        return best

    return seconds(a.bfloat16()) * 1.5 < seconds(a)


ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"


def tune_process_for_training() -> dict[str, bool]:
    """Process-wide settings that suit CPU training, for the program that owns the process (the
    CLI calls this; a library user may): each reports whether it took effect.

    - oneDNN compiles a matmul kernel for each new shape and keeps 1,024 of them; a translator's
      batches have hundreds of row counts, each with about ten kernels, so the cache thrashed.
      Raised to 8,192 unless the user set it; oneDNN reads it at its first matmul, so this must
      run before any.
    - glibc's allocator keeps freed memory for reuse instead of unmapping it: a training step
      frees and allocates the same multi-megabyte activations, whose fresh pages would fault
      again on first touch. Blocks up to 32 MiB (glibc's limit) then come from the heap."""
    os.environ.setdefault(ONEDNN_CACHE_ENV, "8192")
    return {"onednn_cache": os.environ[ONEDNN_CACHE_ENV] == "8192",
            "keep_freed_memory": keep_freed_memory()}


def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed memory for the rest of the process (see
    `tune_process_for_training`); returns whether it could (glibc only)."""
    import ctypes
    import platform

    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt  # the process's own libc: no library search
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))
