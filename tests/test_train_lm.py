import json
import os
import platform
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_LM as TINY
from conftest import crash_after, weights

import scriven.lm as lm_module
from scriven.errors import ScrivenError
from scriven.generation import generate
from scriven.lm import LMTask, evaluate_lm, train_lm


def test_training_lowers_validation_perplexity_and_writes_a_checkpoint(tiny_text, tmp_path):
    result = train_lm(str(tiny_text), tmp_path / "run", max_steps=60, lr=1e-2, **TINY)
    log = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["val_perplexity"] for r in log if "val_perplexity" in r]
    assert ppl[-1] < ppl[0] * 0.7
    assert result.steps == 60
    for name in ("config.json", "model.safetensors", "tokenizer.json", "state.safetensors", "trainer.json"):
        assert (tmp_path / "run" / "latest" / name).is_file()
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
    assert not (tmp_path / "run" / "loss.png").exists()  # the CLI draws curves, not the trainer


def test_same_seed_gives_the_same_weights(tiny_text, tmp_path):
    train_lm(str(tiny_text), tmp_path / "a", max_steps=10, seed=3, **TINY)
    train_lm(str(tiny_text), tmp_path / "b", max_steps=10, seed=3, **TINY)
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("tokenizer, positions, expected", [
    ("char", None, "learned"), ("word", None, "alibi"), ("char", "alibi", "alibi"),
    ("word", "sinusoidal", "sinusoidal")])
def test_a_default_gpt_takes_its_positions_from_the_tokenizer_unless_told(
        tiny_text, tmp_path, tokenizer, positions, expected):
    train_lm(str(tiny_text), tmp_path / "run", model="gpt", preset="default", tokenizer=tokenizer,
             positions=positions, max_steps=1, batch_size=2, seq_len=8, progress=False)
    saved = json.loads((tmp_path / "run" / "latest" / "config.json").read_text())
    assert saved["model"]["positions"] == expected


def test_positions_are_a_gpts_alone(tiny_text, tmp_path):
    with pytest.raises(ScrivenError, match="positions"):
        train_lm(str(tiny_text), tmp_path / "run", positions="alibi", max_steps=1, **TINY)
    assert not (tmp_path / "run").exists()
    train_lm(str(tiny_text), tmp_path / "gpt", model="gpt", max_steps=1, **TINY)
    with pytest.raises(ScrivenError, match="positions"):
        train_lm(str(tiny_text), tmp_path / "gpt", model="gpt", positions="alibi", resume=True,
                 max_steps=2, **TINY)
    with pytest.raises(ScrivenError, match="positions"):
        train_lm(str(tiny_text), tmp_path / "bad", model="gpt", positions="rope", max_steps=1,
                 **TINY)


def test_a_gpt_reads_each_epoch_from_another_offset_and_an_lstm_does_not():
    ids = torch.arange(1001)  # a token's id is its position, so a window shows where it was cut
    gpt = LMTask(ids, ids[:10], 1.0, 4, 16, torch.device("cpu"), carries_state=False)
    lstm = LMTask(ids, ids[:10], 1.0, 4, 16, torch.device("cpu"), carries_state=True)
    assert lstm.steps_per_epoch() == 250 // 16 and gpt.steps_per_epoch() == (250 - 15) // 16
    starts = set()
    for epoch in range(6):
        for task in (gpt, lstm):
            windows = list(task.batches(epoch, 0))
            assert len(windows) == task.steps_per_epoch()
            for i, (x, y) in enumerate(windows):
                assert x.shape == (4, 16) and torch.equal(y, x + 1)
                assert torch.equal(x[:, 0] - task.x[:, 0], torch.full((4,), 16 * i + task.window_offset(epoch)))
            assert list(task.batches(epoch, 3))[0][0].equal(windows[3][0])  # a resume mid-epoch
        starts.add(gpt.window_offset(epoch))
        assert lstm.window_offset(epoch) == 0
    assert gpt.window_offset(0) == 0 and len(starts) > 3 and max(starts) <= 15


@pytest.mark.parametrize("model, optimizer", [("lstm", "adamw"), ("lstm", "muon"), ("gpt", "muon")])
def test_resume_equals_uninterrupted_training(tiny_text, tmp_path, monkeypatch, model, optimizer):
    # Dropout and a cosine schedule both make this a real test of RNG, optimizer and
    # data-position restore. On the CPU: cuDNN's LSTM dropout cannot resume exactly (test_cuda.py).
    # Muon's momentum lives in a second optimizer, saved and restored with AdamW's state.
    args = dict(TINY, preset="seed" if model == "lstm" else "tiny", model=model, max_steps=17,
                dropout=0.3, device="cpu", optimizer=optimizer)
    train_lm(str(tiny_text), tmp_path / "full", **args)

    restore = crash_after(monkeypatch, lm_module.LMTask, steps=10)  # the step-10 checkpoint is on disk
    with pytest.raises(KeyboardInterrupt):
        train_lm(str(tiny_text), tmp_path / "cut", **args)
    restore()
    trainer = json.loads((tmp_path / "cut" / "latest" / "trainer.json").read_text())
    assert trainer["progress"]["step"] == 10
    train_lm(str(tiny_text), tmp_path / "cut", resume=True, **args)

    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_resume_without_a_run_is_a_clear_error(tiny_text, tmp_path):
    with pytest.raises(ScrivenError, match="no such file"):
        train_lm(str(tiny_text), tmp_path / "none", max_steps=5, resume=True, **TINY)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x00\x01\x02binary", "binary"),
    (b"caf\xe9 au lait\n", "UTF-8"),
])
def test_bad_corpus_is_named(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(ScrivenError, match=message):
        train_lm(str(path), tmp_path / "run", max_steps=5, **TINY)


def test_corpus_smaller_than_one_batch(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("just a few words here.\nand a few more.\nthe end.\n")
    with pytest.raises(ScrivenError, match="too few"):
        train_lm(str(path), tmp_path / "run", max_steps=5, **TINY)


def test_evaluate_reports_perplexity_and_bits_per_char(tiny_text, tmp_path):
    train_lm(str(tiny_text), tmp_path / "run", max_steps=10, **TINY)
    metrics = evaluate_lm(tmp_path / "run", str(tiny_text))
    assert metrics["perplexity"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item(), rel=1e-5)
    assert 0 < metrics["bits_per_char"] < 10
    from scriven.evaluation import evaluate
    assert evaluate(tmp_path / "run", str(tiny_text)) == metrics
    with pytest.raises(ScrivenError, match="beam applies to translators"):
        evaluate(tmp_path / "run", str(tiny_text), beam=4)
    with pytest.raises(ScrivenError, match="precision applies to translators"):
        evaluate(tmp_path / "run", str(tiny_text), precision="int8")


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "scriven", *args], capture_output=True, text=True, **kw)


def test_kill_9_during_training_then_resume(tiny_text, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "scriven", "train", "lm", str(tiny_text),
                             "--out", str(run), "--preset", "tiny", "--batch-size", "4",
                             "--seq-len", "8", "--eval-every", "2", "--max-steps", "100000",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            trainer = run / "latest" / "trainer.json"
            if trainer.exists() and json.loads(trainer.read_text())["progress"]["step"] >= 6:
                break
            time.sleep(0.05)
        else:
            pytest.fail("training wrote no checkpoint")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # Whatever moment the kill hit, a complete checkpoint is there to use and to resume.
    out = generate(run, "anna said", max_new_tokens=5, seed=0)
    assert out[0].startswith("Anna said")
    step = json.loads((run / "latest" / "trainer.json").read_text())["progress"]["step"] if (
        run / "latest").exists() else 0
    done = _cli("train", "lm", str(tiny_text), "--out", str(run), "--preset", "tiny",
                "--batch-size", "4", "--seq-len", "8", "--eval-every", "2",
                "--max-steps", str(step + 4), "--resume", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["steps"] == step + 4
    assert (run / "loss.png").stat().st_size > 1000  # the CLI draws the curves


def test_cli_errors_are_one_line_without_traceback(tiny_text, tmp_path):
    bad = _cli("train", "lm", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"), "--max-steps", "1")
    assert bad.returncode != 0
    assert "Traceback" not in bad.stderr and "missing.txt" in bad.stderr
    bad = _cli("train", "lm", str(tiny_text), "--out", str(tmp_path / "r"), "--max-steps", "0")
    assert bad.returncode != 0 and "max_steps" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("preset, expected", [(None, "8192"), ("100", "100")])
def test_training_processes_raise_onednn_kernel_cache_unless_the_user_set_it(preset, expected):
    """Batches of many shapes thrash oneDNN's default cache of 1,024 compiled matmuls: the CLI's
    training commands raise it; importing scriven changes nothing."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = ("import os, scriven; before = os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'); "
            "from scriven.device import tune_process_for_training; tune_process_for_training(); "
            "print(before, os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == [str(preset), expected]


_KEEP_CHECK = """
import ctypes, torch
from scriven.device import keep_freed_memory
assert keep_freed_memory()
class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
x = torch.ones(4 << 20)  # a 16 MiB activation
mapped_alone = libc.mallinfo2().hblkhd >= 16 << 20  # its own mapping, unmapped when freed?
del x
print(mapped_alone, libc.mallinfo2().fordblks >= 16 << 20)  # or kept in the heap for reuse
"""


@pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator")
def test_keep_freed_memory_keeps_freed_activations_for_reuse():
    """The CLI's training calls keep_freed_memory: a freed multi-MiB activation stays in the heap, so the
    next one reuses its pages instead of mapping fresh ones that fault on first touch."""
    out = subprocess.run([sys.executable, "-c", _KEEP_CHECK], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "True"]
