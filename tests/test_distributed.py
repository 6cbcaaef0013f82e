"""torchrun data parallelism on CPU (gloo): 2 processes at batch B train like 1 process at 2B."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from scriven.device import Distributed, resolve_device
from scriven.errors import ScrivenError


def losses(run):
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x]


@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_two_processes_match_one_process_at_double_batch(tiny_text, tmp_path, model):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    common = ["train", "lm", str(tiny_text), "--model", model, "--preset", "tiny", "--seq-len", "8",
              "--log-every", "1", "--eval-every", "5", "--amp", "off", "--no-progress",
              "--device", "cpu"]
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


def test_a_bare_cuda_device_gets_an_index_and_each_process_its_own_gpu(monkeypatch):
    """torch.cuda.set_device refuses a device without an index; torchrun processes each take
    their own GPU, and more processes than GPUs on a machine is a clear error."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("auto") == torch.device("cuda:0")
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda", Distributed(1, 2, 1)) == torch.device("cuda:1")
    with pytest.raises(ScrivenError, match="process 2 has no GPU of its own: this machine has 2"):
        resolve_device("cuda", Distributed(2, 3, 2))
    with pytest.raises(ScrivenError, match="'cuda:2' was asked for, but this machine has 2 GPU"):
        resolve_device("cuda:2")
