import random

import pytest


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
