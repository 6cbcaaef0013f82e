"""What every benchmark records about the machine it ran on, and the portable profiles.

`--profile portable` measures what a laptop with AVX2 gets, on any x86-64 machine: the benchmark
runs again in a child process with PyTorch, oneDNN, MKL, fbgemm and CTranslate2 held to AVX2,
and scriven's kernels held to their AVX2 build (generation only; training runs plain PyTorch, as
on such a laptop). ONNX Runtime has no such switch: it picks its kernels from the CPU itself, so
its figures under this profile are what it runs on this CPU, not on an AVX2 one. `--profile
plain` is the same without any scriven kernel: what a CPU runs where none
builds (ARM machines, or no C compiler), as near as an x86 machine can show it. Those libraries
read their instruction-set limits once, when they load, so the variables must be set before
`import torch`; hence a child process rather than a switch inside this one.

    from machine import add_profile_argument, enter_profile, machine_info
    parser = argparse.ArgumentParser(); add_profile_argument(parser); args = parser.parse_args()
    enter_profile(args)              # re-runs this script in a portable child where asked
    ...
    summary["machine"] = machine_info(args.profile)
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

PROFILES = ("native", "portable", "plain")
PORTABLE_ENV = {
    "SCRIVEN_NATIVE": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
    "CT2_FORCE_CPU_ISA": "AVX2",
}
PROFILE_ENV = {"portable": PORTABLE_ENV, "plain": {**PORTABLE_ENV, "SCRIVEN_NATIVE": "0"}}
_CHILD_ENV = "SCRIVEN_BENCH_PROFILE"  # set in the child, so it does not start another
# The flags that decide which kernels run; /proc/cpuinfo lists a hundred more.
_FLAGS_OF_INTEREST = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                      "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd")


def add_profile_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", choices=PROFILES, default="native",
                        help="native: the machine as it is; portable: PyTorch/oneDNN/MKL/fbgemm "
                             "and scriven's kernels held to AVX2 (what an AVX2 laptop runs); "
                             "plain: the same without scriven's kernels (as where none builds)")


def enter_profile(args: argparse.Namespace) -> None:
    """Where `--profile portable` or `plain` is asked for and this is not yet that profile's
    child, run this script again in one, with the same arguments, and exit with its status. The
    process that runs the work gets the settings the CLI gives its own
    (`tune_process_for_training`), so a benchmark measures what `scriven train` runs."""
    if args.profile == "native" or os.environ.get(_CHILD_ENV) == args.profile:
        from scriven.device import tune_process_for_training

        tune_process_for_training()
        return
    env = {**os.environ, **PROFILE_ENV[args.profile], _CHILD_ENV: args.profile}
    sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), []
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = [f for f in value.split() if f in _FLAGS_OF_INTEREST]
    return model, flags


def matmul_peak(dtype, n: int = 2048, repeats: int = 5, device="cpu") -> float:
    """FLOP/s of the best of `repeats` n×n×n matmuls in `dtype` on `device`."""
    import torch

    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def machine_info(profile: str = "native", device: str = "cpu", peaks: bool = True) -> dict:
    """CPU model and flags, the profile, threads, torch, which accelerations load, and the fp32
    and bf16 matmul peaks measured now (GFLOP/s), for ratios within this run."""
    import torch

    from scriven import accel
    from scriven.accel import native

    model, flags = cpu_model_and_flags()
    generation = native.generation_library()
    info: dict = {
        "cpu": model, "cpu_flags": flags, "profile": profile, "device": device,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_kernels": accel.native_available(),
        "generation_kernels": generation.build if generation is not None else None,
    }
    if profile in PROFILE_ENV:
        info["profile_env"] = PROFILE_ENV[profile]
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    if peaks:
        from scriven.device import bf16_matmuls_fast

        n = 2048 if device == "cpu" else 8192
        # Emulated bf16 (no native bf16 here) is slow: a smaller product says as much.
        n_bf16 = n if device != "cpu" or bf16_matmuls_fast() else 512
        info["peak_gflops"] = {
            "fp32": round(matmul_peak(torch.float32, n, device=device) / 1e9, 1),
            "bf16": round(matmul_peak(torch.bfloat16, n_bf16, device=device) / 1e9, 1),
        }
    return info
