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
