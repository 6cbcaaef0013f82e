"""Checkpoints written before the accelerator refactor load now and give the same logits, plain
and with whatever `accel.apply` swaps in here.

The fixtures (tests/fixtures/make_pre_accel.py, run with commit 5666efd's code) hold each tiny
model's config.json and tokenizer.json as that code wrote them, the names and shapes of the
weights it saved, fixed inputs and the logits it computed. The weights themselves are seeded
random numbers, made again here, so that no weights file is kept in git."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from scriven import accel
from scriven import checkpoint as ckpt_io

FIXTURES = Path(__file__).parent / "fixtures" / "pre_accel"


def weights_from_seed(names_and_shapes: list, seed: int) -> dict[str, torch.Tensor]:
    """As make_pre_accel.py: N(0, 0.2²) numbers from one seeded generator, in the listed order."""
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) * 0.2 for name, shape in names_and_shapes}


@pytest.mark.parametrize("mode", [None, "infer", "train"])
@pytest.mark.parametrize("name", ["lstm", "gpt", "tr"])
def test_pre_refactor_checkpoint_gives_the_same_logits(name, mode, tmp_path):
    expected = json.loads((FIXTURES / name / "expected.json").read_text())
    for f in ("config.json", "tokenizer.json"):
        shutil.copy(FIXTURES / name / f, tmp_path / f)
    save_file(weights_from_seed(expected["weights"], expected["seed"]),
              str(tmp_path / "model.safetensors"))
    model, _, _ = ckpt_io.load_model(tmp_path, torch.device("cpu"),
                                     kinds=("lstm", "gpt", "transformer"))
    if mode is not None:
        accel.apply(model, "cpu", mode)
    model.eval()
    inputs = {k: torch.tensor(v) for k, v in expected["inputs"].items()}
    with torch.no_grad():
        logits = model(inputs["src"], inputs["tgt"]) if name == "tr" else model(inputs["ids"])[0]
    want = torch.tensor(expected["logits"]).view(expected["logits_shape"])
    torch.testing.assert_close(logits, want, atol=2e-5, rtol=1e-5)
