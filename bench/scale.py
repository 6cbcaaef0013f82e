"""Data-parallel scaling on this machine: training tokens/s with 1 and 2 processes (torchrun,
gloo), and the gradient traffic per step, so you can estimate what more machines would give.
Prints one JSON summary.

    SCRIVEN_DATA_MIRROR=../shared/data python bench/scale.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from scriven.lm import MODELS


def run(cmd: list[str], env: dict[str, str]) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def gradient_bytes(model: str, preset: str, vocab: int) -> int:
    config_cls, model_cls, _ = MODELS[model]
    net = model_cls(config_cls.preset(preset, vocab))
    return sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lstm", choices=list(MODELS))
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32, help="global streams per step")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scriven-scale-"))
    common = ["train", "lm", "anna", "--model", args.model, "--preset", args.preset,
              "--max-steps", str(args.steps), "--eval-every", str(10 * args.steps),
              "--no-progress", "--seq-len", "64"]
    results = {}
    for procs in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // procs)))
        launcher = [sys.executable, "-m", "scriven"] if procs == 1 else \
            ["torchrun", "--standalone", f"--nproc_per_node={procs}", "-m", "scriven"]
        out = run([*launcher, *common, "--batch-size", str(args.batch_size // procs),
                   "--out", str(work / f"p{procs}")], env)
        results[procs] = out
    vocab = json.loads((work / "p1" / "latest" / "config.json").read_text())["model"]["vocab_size"]
    grad = gradient_bytes(args.model, args.preset, vocab)
    t1 = results[1]["tokens_per_second"]
    tokens_per_step = args.batch_size * 64
    step_seconds = tokens_per_step / t1
    per_process = {n: round(2 * (n - 1) / n * grad) for n in (2, 4, 8, 16)}
    summary = {
        "bench": "scale",
        "model": args.model, "preset": args.preset, "global_batch": args.batch_size,
        "tokens_per_second": {"1_process": t1, "2_processes": results[2]["tokens_per_second"]},
        "speedup_2_vs_1": round(results[2]["tokens_per_second"] / t1, 3),
        "gradient_bytes_per_step": grad,
        "ring_allreduce_bytes_sent_per_process_per_step": per_process,
        "compute_seconds_per_step_1_process": round(step_seconds, 3),
        "allreduce_seconds_per_step_at": {
            f"{gbit}Gbit/s": round(per_process[8] * 8 / (gbit * 1e9), 4) for gbit in (1, 10, 100)},
        "note": "2 processes share this machine's 2 cores, so their speedup measures overhead, "
                "not added compute; on N machines expect up to N x when the all-reduce time at "
                "your network speed is small against the compute time per step.",
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
