"""A GPT's context is the window it was trained on, from training through evaluation and
generation (issue 20, item 1)."""

import json

import pytest
import torch
from conftest import TINY_LM, one_thread

from scriven import checkpoint as ckpt_io
from scriven.checkpoint import trained_context
from scriven.data import read_text
from scriven.generation import LoadedLM, generate
from scriven.lm import _cut_text, evaluate_lm, lm_metrics, stream_nll, train_lm


def test_gpt_checkpoint_records_its_trained_context(tiny_text, tmp_path):
    run = tmp_path / "gpt"
    with one_thread():
        train_lm(str(tiny_text), run, model="gpt", max_steps=12, **TINY_LM)
    config = json.loads((run / "best" / "config.json").read_text())
    assert config["model"]["max_len"] == TINY_LM["seq_len"] == trained_context(config)

    # `scriven evaluate` scores with the training window, not with the preset's 64 positions.
    model, tok, _ = ckpt_io.load_model(run / "best", torch.device("cpu"), kinds=("gpt",))
    ids = torch.tensor(tok.encode(read_text(str(tiny_text))), dtype=torch.long)
    nll, count = stream_nll(model, ids, torch.device("cpu"), window=TINY_LM["seq_len"])
    assert evaluate_lm(run / "best", str(tiny_text), device="cpu")["loss"] == \
        lm_metrics(nll, count, 1.0)["loss"]

    # Generation slides its window at the trained context, so it runs past it.
    lm = LoadedLM.load(run / "best", device="cpu")
    assert lm.context == TINY_LM["seq_len"]
    out = generate(lm, "anna said", max_new_tokens=3 * TINY_LM["seq_len"], seed=0)[0]
    assert out.startswith("Anna said")


def test_a_gpt_trains_the_context_asked_for_past_its_preset_and_auto(tiny_text, tmp_path):
    # The tiny preset has 64 positions and auto's candidates their own windows: a longer
    # --seq-len is what the model is built for, not an error.
    with one_thread():
        train_lm(str(tiny_text), tmp_path / "long", model="gpt", max_steps=2,
                 **{**TINY_LM, "seq_len": 80, "batch_size": 1})
        train_lm(str(tiny_text), tmp_path / "auto", model="gpt", preset="auto", minutes=0.05,
                 batch_size=1, seq_len=80, progress=False)
    for run in ("long", "auto"):
        config = json.loads((tmp_path / run / "latest" / "config.json").read_text())
        assert config["model"]["max_len"] == config["train"]["seq_len"] == 80


def test_validation_during_training_equals_evaluate(tiny_text, tmp_path):
    """The trainer's validation and `evaluate` on the same text see the same windows (fp32 both,
    so they agree to rounding)."""
    run = tmp_path / "gpt"
    with one_thread():
        result = train_lm(str(tiny_text), run, model="gpt", max_steps=10, amp="off", **TINY_LM)
    text = read_text(str(tiny_text))
    _, valid_text, _ = _cut_text(text, 0.05, 0.05)
    valid = tmp_path / "valid.txt"
    valid.write_text(valid_text, encoding="utf-8")
    scored = evaluate_lm(run / "latest", str(valid), device="cpu")
    assert abs(scored["loss"] - result.metrics["loss"]) < 1e-6


def test_older_checkpoints_infer_their_trained_context():
    # Before max_len followed seq_len, a GPT kept the preset's 256 positions but trained on
    # seq_len-token windows: the training config says how far its positions were trained.
    assert trained_context({"model": {"max_len": 256}, "train": {"seq_len": 64}}) == 64
    assert trained_context({"model": {"max_len": 256}}) == 256
    assert trained_context({"model": {"max_len": 32}, "train": {"seq_len": 64}}) == 32


def _one_window_at_a_time(model, ids, window):
    """The sliding evaluation written plainly: each window's second half is scored."""
    total, scored, n = 0.0, 0, ids.numel() - 1
    while scored < n:
        start = max(0, scored - window // 2)
        end = min(start + window, n)
        logits, _ = model(ids[start:end][None])
        total += torch.nn.functional.cross_entropy(
            logits[0, scored - start:], ids[scored + 1:end + 1], reduction="sum").item()
        scored = end
    return total


def test_batched_windows_score_as_one_window_at_a_time():
    from scriven.models.gpt import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, d_model=16, n_heads=2, n_layers=1, d_ff=32, dropout=0.0,
                          max_len=12)).eval()
    for n in (5, 12, 13, 50, 101):
        ids = torch.randint(0, 30, (n,))
        with torch.no_grad():
            nll, count = stream_nll(model, ids, torch.device("cpu"), window=12)
            assert count == n - 1
            assert nll == pytest.approx(_one_window_at_a_time(model, ids, 12), rel=1e-5)
