"""Checkpoints written before the accelerator refactor (tiny runs saved by commit 5666efd, with
the logits that code computed for fixed inputs) load now and give the same logits, plain and
with whatever `accel.apply` swaps in here."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scriven import accel
from scriven import checkpoint as ckpt_io

FIXTURES = Path(__file__).parent / "fixtures" / "pre_accel"


@pytest.mark.parametrize("mode", [None, "infer", "train"])
@pytest.mark.parametrize("name", ["lstm", "gpt", "tr"])
def test_pre_refactor_checkpoint_gives_the_same_logits(name, mode):
    model, _, _ = ckpt_io.load_model(FIXTURES / name, torch.device("cpu"),
                                     kinds=("lstm", "gpt", "transformer"))
    if mode is not None:
        accel.apply(model, "cpu", mode)
    model.eval()
    expected = load_file(str(FIXTURES / name / "expected.safetensors"))
    with torch.no_grad():
        if name == "tr":
            logits = model(expected["src"], expected["tgt"])
        else:
            logits = model(expected["ids"])[0]
    torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=1e-5)
