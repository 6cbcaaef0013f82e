import contextlib
import json
import os
import random

import pytest
import torch
from safetensors.torch import load_file

# Training arguments for tiny runs (seconds on a CPU).
TINY_LM = dict(preset="tiny", batch_size=4, seq_len=8, eval_every=5, progress=False)
TINY_TRANSLATOR = dict(preset="tiny", vocab_size=300, max_tokens=512, lr=3e-3, warmup_steps=10,
                       bleu_sentences=8, progress=False)


def weights(run):
    """The weights of a run's latest checkpoint."""
    return load_file(str(run / "latest" / "model.safetensors"))


def as_before_per_task_configs(run) -> None:
    """Rewrite `run/latest`'s training config as scriven wrote it before each task had its own
    config: every task's fields, the other task's at their defaults."""
    path = run / "latest" / "config.json"
    config = json.loads(path.read_text())
    config["train"] = {"batch_size": 32, "seq_len": 64, "max_tokens": 4096, **config["train"]}
    path.write_text(json.dumps(config))


def make_text(lines: int = 300, seed: int = 0) -> str:
    """A tiny generated corpus with some structure for a model to learn."""
    rng = random.Random(seed)
    subjects = ["anna", "the prince", "levin", "she", "he", "the nurse", "kitty"]
    verbs = ["said", "looked at", "went to", "thought of", "smiled at", "saw"]
    objects = ["the house", "the garden", "her son", "the station", "the window", "him"]
    out = []
    for _ in range(lines):
        s = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        if rng.random() < 0.3:
            s += f", and {rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}"
        out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"]))
    return "\n".join(out) + "\n"


@pytest.fixture
def tiny_text(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text(make_text(), encoding="utf-8")
    return path


def crash_after(monkeypatch, task_cls, steps: int):
    """Make `task_cls.loss` raise KeyboardInterrupt (like Ctrl-C mid-run) once `steps` steps have
    run; returns a function that restores the real loss."""
    real = task_cls.loss
    calls = {"n": 0}

    def loss(self, model, batch, smoothing):
        calls["n"] += 1
        if calls["n"] > steps:
            raise KeyboardInterrupt
        return real(self, model, batch, smoothing)

    monkeypatch.setattr(task_cls, "loss", loss)
    return lambda: monkeypatch.setattr(task_cls, "loss", real)


@contextlib.contextmanager
def one_thread():
    """Tiny models run fastest on one thread, and a shared 2-core machine stays usable."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SUBJECTS = [("I", "Je", "see", "vois"), ("You", "Tu", "see", "vois"), ("He", "Il", "sees", "voit"),
            ("She", "Elle", "sees", "voit"), ("We", "Nous", "see", "voyons"),
            ("They", "Ils", "see", "voient"), ("My friends", "Mes amis", "see", "voient")]
OBJECTS = [("the cat", "le chat"), ("the dog", "le chien"), ("the house", "la maison"),
           ("the car", "la voiture"), ("a tree", "un arbre"), ("the sea", "la mer"),
           ("the garden", "le jardin"), ("a bird", "un oiseau"), ("the moon", "la lune"),
           ("the teacher", "le professeur"), ("my brother", "mon frère"), ("the school", "l'école")]
WHEN = [("", ""), (" today", " aujourd'hui"), (" now", " maintenant"), (" again", " encore"),
        (" every day", " tous les jours"), (" at night", " la nuit")]


def make_pairs(n: int = 300, seed: int = 0) -> list[tuple[str, str]]:
    """Distinct English→French pairs from a small grammar (accents and capitals included)."""
    rng = random.Random(seed)
    out: set[tuple[str, str]] = set()
    while len(out) < n:
        (se, sf, ve, vf), (oe, of), (we, wf) = rng.choice(SUBJECTS), rng.choice(OBJECTS), rng.choice(WHEN)
        out.add((f"{se} {ve} {oe}{we}.", f"{sf} {vf} {of}{wf}."))
    return sorted(out)


def write_pairs(path, pairs) -> str:
    path.write_text("".join(f"{a}\t{b}\n" for a, b in pairs), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs.tsv", make_pairs())


REQUIRE_NATIVE_ENV = "SCRIVEN_REQUIRE_NATIVE"


def pytest_runtest_setup(item):
    """Tests marked `native` (or `amx`) need scriven's native kernels (AMX: the tile units
    too). Where those do not load they skip, saying why, unless SCRIVEN_REQUIRE_NATIVE=1, which
    turns the skip into a failure so that a capable machine proves they ran."""
    from scriven.accel import native

    for mark, missing in (("native", lambda: native.library() is None),
                          ("amx", lambda: not native.amx_bf16())):
        if item.get_closest_marker(mark) is None or not missing():
            continue
        reason = (f"needs scriven's native kernels{' with AMX' if mark == 'amx' else ''} "
                  f"({native.unavailable() or 'no AMX bf16 here'})")
        if os.environ.get(REQUIRE_NATIVE_ENV) == "1":
            pytest.fail(f"{REQUIRE_NATIVE_ENV}=1, but this test {reason}")
        pytest.skip(reason)
def pytest_addoption(parser):
    parser.addoption("--faults-long", action="store_true", default=False,
                     help="run the long fault battery (tests/test_faults.py)")
