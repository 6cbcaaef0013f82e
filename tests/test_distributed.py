"""torchrun data parallelism on CPU (gloo): 2 processes at batch B train like 1 process at 2B."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_two_processes_match_one_process_at_double_batch(tiny_text, tmp_path, model):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    common = ["train", "lm", str(tiny_text), "--model", model, "--preset", "tiny", "--seq-len", "8",
              "--log-every", "1", "--eval-every", "5", "--amp", "off", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "scriven", *common, "--max-steps", "5", "--batch-size", "4",
                          "--out", str(tmp_path / "one")], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", "-m", "scriven",
                          *common, "--max-steps", "5", "--batch-size", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-4)
    a = load_file(str(tmp_path / "one" / "latest" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "latest" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Only rank 0 wrote, and the checkpoint holds the unwrapped model (no "module." prefix).
    assert not any(k.startswith("module.") for k in b)
    # A 2-process checkpoint resumes in 1 process.
    more = subprocess.run([sys.executable, "-m", "scriven", *common, "--max-steps", "7",
                           "--batch-size", "4", "--out", str(tmp_path / "two"), "--resume"],
                          capture_output=True, text=True, env=env)
    assert more.returncode == 0, more.stderr
    assert json.loads(more.stdout)["steps"] == 7
