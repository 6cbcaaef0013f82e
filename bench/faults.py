"""Fault battery: kills, crafted inputs and a loaded server. Prints one JSON summary.

    kills     a tiny training run is killed with SIGKILL at random moments, each kill followed by
              `--resume` to the end; the final weights must equal an uninterrupted run's
    crafted   damaged or hostile checkpoints, corpora, pair files and settings, each given to
              the command line (in this process, through `scriven.cli.main`); each must be a
              one-line `error: ...` and a non-zero exit, never a traceback
    serve     a loopback `scriven serve` under concurrent streaming requests, a tenth of the
              clients leaving after the first event: no 5xx, the queue drains after each round,
              and the server's resident memory stays within 10 % from round to round

Targets (issue 18): >= 20 kills with 20 exact resumes; >= 60 crafted inputs with 0 tracebacks;
2,000 requests with 0 5xx and RSS within 10 % across rounds.

    python bench/faults.py                          # the full battery (a few minutes)
    python bench/faults.py --kills 3 --requests 100 # a short one

`tests/test_faults.py` runs the same pieces, short by default.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                    os.environ.get("PYTHONPATH")])))


def make_text(lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    subjects = ["anna", "the prince", "levin", "she", "he", "the nurse", "kitty"]
    verbs = ["said", "looked at", "went to", "thought of", "smiled at", "saw"]
    objects = ["the house", "the garden", "her son", "the station", "the window", "him"]
    return "\n".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                     for _ in range(lines)) + "\n"


def make_pairs(n: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    nouns = {"cat": "chat", "dog": "chien", "house": "maison", "man": "homme",
             "woman": "femme", "child": "enfant", "book": "livre", "car": "voiture"}
    adjectives = {"big": "grand", "small": "petit", "red": "rouge", "old": "vieux"}
    verbs = {"sleeps": "dort", "eats": "mange", "runs": "court", "sings": "chante"}
    lines = set()
    while len(lines) < min(n, len(nouns) * len(adjectives) * len(verbs)):
        a, b, c = rng.choice(list(nouns)), rng.choice(list(adjectives)), rng.choice(list(verbs))
        lines.add(f"the {b} {a} {c}.\tle {nouns[a]} {adjectives[b]} {verbs[c]}.")
    return "\n".join(sorted(lines)) + "\n"


# ---------------------------------------------------------------------------------------------
# Kills


TRAIN = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "8", "--eval-every", "10",
         "--log-every", "5", "--amp", "off", "--device", "cpu", "--no-progress"]


def _train(text: Path, out: Path, steps: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "scriven", "train", "lm", str(text), "--out",
                             str(out), "--max-steps", str(steps), *TRAIN, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(run / "latest" / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _finish(proc: subprocess.Popen, what: str) -> None:
    _, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}): {err.strip()[-500:]}")


def kill_battery(kills: int, folder: Path, steps: int = 300, seed: int = 0) -> dict:
    """`kills` times: start (or resume) the run, SIGKILL it at a random moment once training
    has begun, then `--resume` it to the end and compare with the uninterrupted run."""
    rng = random.Random(seed)
    text = folder / "kill.txt"
    text.write_text(make_text(400), encoding="utf-8")
    reference = folder / "reference"
    _finish(_train(text, reference, steps), "the uninterrupted run")
    want = _weights(reference)
    survived = exact = 0
    killed_at: list[int] = []
    for k in range(kills):
        run = folder / f"killed-{k}"
        proc = _train(text, run, steps)
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() and proc.poll() is None:
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        trainer = run / "latest" / "trainer.json"
        old = run / "latest.old" / "trainer.json"
        source = trainer if trainer.exists() else old if old.exists() else None
        killed_at.append(json.loads(source.read_text())["progress"]["step"] if source else 0)
        # No checkpoint yet: nothing to resume, so start again (the folder holds a log).
        again = ("--resume",) if source else ("--overwrite",)
        _finish(_train(text, run, steps, *again), f"resuming kill {k}")
        survived += 1
        exact += _same(want, _weights(run))
    return {"kills": kills, "survived": survived, "exact_resumes": exact,
            "checkpoint_steps_at_kill": killed_at}


# ---------------------------------------------------------------------------------------------
# Crafted inputs


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _safetensors_header(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


def crafted_cases(lm: Path, translator: Path, folder: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) for each crafted input: copies of good checkpoints with one thing broken,
    bad corpora and pair files, and bad settings. Every one must be refused in one line."""
    import shutil

    import torch
    from safetensors.torch import save_file

    good = lm / "best"
    cases: list[tuple[str, list[str]]] = []

    def checkpoint(name: str, change: Callable[[Path], None], base: Path = good,
                   command: tuple[str, ...] = ("generate", "{ckpt}", "anna said",
                                               "--max-new-tokens", "3", "--device", "cpu")):
        target = folder / "ckpt" / name
        shutil.copytree(base, target)
        change(target)
        cases.append((name, [a.replace("{ckpt}", str(target)) for a in command]))

    def config_edit(edit: Callable[[dict], object], replace: bool = False
                    ) -> Callable[[Path], None]:
        """`edit` changes the config in place, or with `replace` returns a new document."""
        def change(target: Path) -> None:
            config = json.loads((target / "config.json").read_text())
            result = edit(config)
            (target / "config.json").write_text(json.dumps(result if replace else config))
        return change

    def write(file: str, data: bytes | str) -> Callable[[Path], None]:
        def change(target: Path) -> None:
            (target / file).unlink(missing_ok=True)
            if isinstance(data, str):
                (target / file).write_text(data, encoding="utf-8")
            else:
                (target / file).write_bytes(data)
        return change

    def remove(file: str) -> Callable[[Path], None]:
        return lambda target: (target / file).unlink()

    def as_folder(file: str) -> Callable[[Path], None]:
        def change(target: Path) -> None:
            (target / file).unlink()
            (target / file).mkdir()
        return change

    model_config = json.loads((good / "config.json").read_text())["model"]
    size_key = next(k for k in model_config if k.endswith("vocab_size"))
    other_int = next(k for k, v in model_config.items()
                     if isinstance(v, int) and not isinstance(v, bool) and k != size_key
                     and v > 1)

    def model_set(key: str, value: object) -> Callable[[Path], None]:
        return config_edit(lambda c: c["model"].__setitem__(key, value))

    # config.json
    checkpoint("vocab-1e12-int", model_set(size_key, 10**12))
    checkpoint("vocab-1e12-float", model_set(size_key, 1e12))
    checkpoint("vocab-negative", model_set(size_key, -1))
    checkpoint("vocab-string", model_set(size_key, "big"))
    checkpoint("vocab-null", model_set(size_key, None))
    checkpoint("vocab-bool", model_set(size_key, True))
    checkpoint("vocab-double", model_set(size_key, model_config[size_key] * 2))
    checkpoint(f"{other_int}-double", model_set(other_int, model_config[other_int] * 2))
    checkpoint(f"{other_int}-huge", model_set(other_int, 2**40))
    checkpoint("model-extra-key", model_set("evil", 1))
    checkpoint("model-list", config_edit(lambda c: c.__setitem__("model", [])))
    checkpoint("model-missing", config_edit(lambda c: c.pop("model")))
    checkpoint("kind-unknown", config_edit(lambda c: c.__setitem__("kind", "nope")))
    checkpoint("kind-missing", config_edit(lambda c: c.pop("kind")))
    checkpoint("kind-number", config_edit(lambda c: c.__setitem__("kind", 5)))
    checkpoint("format-newer", config_edit(lambda c: c.__setitem__("format", 99)))
    checkpoint("format-string", config_edit(lambda c: c.__setitem__("format", "1")))
    checkpoint("config-array", config_edit(lambda c: [], replace=True))
    checkpoint("config-string", config_edit(lambda c: "checkpoint", replace=True))
    checkpoint("config-random-bytes", write("config.json", os.urandom(256)))
    checkpoint("config-not-utf8", write("config.json", b'{"kind": "lstm\xff"}'))
    checkpoint("config-nested", write("config.json", _nested(100_000)))
    checkpoint("config-empty", write("config.json", b""))
    checkpoint("config-truncated", write("config.json", (good / "config.json").read_bytes()[:40]))
    checkpoint("config-nan", write("config.json", (good / "config.json").read_text().replace(
        f'"{size_key}": {model_config[size_key]}', f'"{size_key}": NaN')))
    checkpoint("config-inf", write("config.json", (good / "config.json").read_text().replace(
        f'"{size_key}": {model_config[size_key]}', f'"{size_key}": 1e400')))
    checkpoint("config-folder", as_folder("config.json"))
    checkpoint("config-missing", remove("config.json"))
    # tokenizer.json
    tokenizer = json.loads((good / "tokenizer.json").read_text())

    def tok_edit(edit: Callable[[dict], object], replace: bool = False) -> Callable[[Path], None]:
        def change(target: Path) -> None:
            doc = json.loads(json.dumps(tokenizer))
            result = edit(doc)
            (target / "tokenizer.json").write_text(json.dumps(result if replace else doc))
        return change

    checkpoint("tokenizer-random-bytes", write("tokenizer.json", os.urandom(256)))
    checkpoint("tokenizer-not-utf8", write("tokenizer.json", b'{"tokens": ["\xff"]}'))
    checkpoint("tokenizer-nested", write("tokenizer.json", _nested(100_000)))
    checkpoint("tokenizer-nested-object", write("tokenizer.json",
                                                '{"a":' * 50_000 + "1" + "}" * 50_000))
    checkpoint("tokenizer-empty", write("tokenizer.json", b""))
    checkpoint("tokenizer-empty-object", tok_edit(lambda d: {}, replace=True))
    checkpoint("tokenizer-array", tok_edit(lambda d: [], replace=True))
    checkpoint("tokenizer-no-tokens", tok_edit(lambda d: d.pop("tokens")))
    checkpoint("tokenizer-tokens-string", tok_edit(lambda d: d.__setitem__("tokens", "abc")))
    checkpoint("tokenizer-tokens-numbers", tok_edit(lambda d: d.__setitem__("tokens", [1, 2])))
    checkpoint("tokenizer-fewer-tokens", tok_edit(
        lambda d: d.__setitem__("tokens", d["tokens"][:-3])))
    checkpoint("tokenizer-more-tokens", tok_edit(
        lambda d: d.__setitem__("tokens", d["tokens"] + ["zzz1", "zzz2"])))
    checkpoint("tokenizer-duplicate", tok_edit(
        lambda d: d.__setitem__("tokens", d["tokens"][:-1] + [d["tokens"][-2]])))
    checkpoint("tokenizer-version", tok_edit(lambda d: d.__setitem__("version", 99)))
    checkpoint("tokenizer-kind", tok_edit(lambda d: d.__setitem__("kind", "nope")))
    checkpoint("tokenizer-no-kind", tok_edit(lambda d: d.pop("kind")))
    checkpoint("tokenizer-no-format", tok_edit(lambda d: d.pop("format")))
    checkpoint("tokenizer-hf-wordpiece", tok_edit(
        lambda d: {"model": {"type": "WordPiece"}, "added_tokens": []}, replace=True))
    checkpoint("tokenizer-hf-garbage", tok_edit(
        lambda d: {"model": {"type": "BPE", "vocab": 5}, "added_tokens": "x"}, replace=True))
    checkpoint("tokenizer-folder", as_folder("tokenizer.json"))
    checkpoint("tokenizer-missing", remove("tokenizer.json"))
    # model.safetensors
    weights_file = good / "model.safetensors"
    checkpoint("weights-random-bytes", write("model.safetensors", os.urandom(4096)))
    checkpoint("weights-empty", write("model.safetensors", b""))
    checkpoint("weights-truncated", write("model.safetensors",
                                          weights_file.read_bytes()[: weights_file.stat().st_size // 2]))
    checkpoint("weights-huge-header-length", write("model.safetensors",
                                                   struct.pack("<Q", 2**62) + b"{}"))
    checkpoint("weights-header-huge-shape", write("model.safetensors", _safetensors_header(
        {"embed.weight": {"dtype": "F32", "shape": [10**12, 32], "data_offsets": [0, 128]}},
        b"\0" * 128)))
    checkpoint("weights-header-not-json", write("model.safetensors",
                                                struct.pack("<Q", 8) + b"notjson!"))

    def pickle_weights(target: Path) -> None:
        from safetensors.torch import load_file
        torch.save(load_file(str(weights_file)), target / "model.safetensors")

    checkpoint("weights-a-pickle", pickle_weights)

    def tensors_edit(edit: Callable[[dict], None]) -> Callable[[Path], None]:
        def change(target: Path) -> None:
            from safetensors.torch import load_file
            tensors = load_file(str(weights_file))
            edit(tensors)
            (target / "model.safetensors").unlink()
            save_file(tensors, str(target / "model.safetensors"))
        return change

    checkpoint("weights-extra-tensor", tensors_edit(lambda t: t.__setitem__("evil", torch.zeros(1))))
    checkpoint("weights-missing-tensor", tensors_edit(lambda t: t.pop(sorted(t)[0])))
    first = sorted(json.loads(weights_file.read_bytes()[8:8 + struct.unpack(
        "<Q", weights_file.read_bytes()[:8])[0]]))
    name = next(n for n in first if n != "__metadata__")
    checkpoint("weights-wrong-shape", tensors_edit(
        lambda t: t.__setitem__(name, torch.zeros(3, 3))))
    checkpoint("weights-no-tensors", tensors_edit(lambda t: t.clear()))
    checkpoint("weights-folder", as_folder("model.safetensors"))
    checkpoint("weights-missing", remove("model.safetensors"))
    # whole checkpoints
    cases.append(("checkpoint-nonexistent", ["generate", str(folder / "nowhere"), "anna"]))
    (folder / "a-file").write_text("not a checkpoint")
    cases.append(("checkpoint-is-a-file", ["generate", str(folder / "a-file"), "anna"]))
    (folder / "empty-dir").mkdir()
    cases.append(("checkpoint-empty-folder", ["generate", str(folder / "empty-dir"), "anna"]))
    cases.append(("translator-to-generate", ["generate", str(translator), "anna"]))
    cases.append(("lm-to-translate", ["translate", str(lm), "the cat", "--device", "cpu"]))
    checkpoint("translator-vocab-1e12", config_edit(
        lambda c: c["model"].update(src_vocab_size=10**12, tgt_vocab_size=10**12)),
        base=translator / "best", command=("translate", "{ckpt}", "the cat", "--device", "cpu"))
    checkpoint("translator-tokenizer-bytes", write("tokenizer.json", os.urandom(64)),
               base=translator / "best", command=("translate", "{ckpt}", "the cat"))
    bpe = json.loads((translator / "best" / "tokenizer.json").read_text())

    def bpe_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
        def change(target: Path) -> None:
            doc = json.loads(json.dumps(bpe))
            edit(doc)
            (target / "tokenizer.json").write_text(json.dumps(doc))
        return change

    translate = ("translate", "{ckpt}", "the cat", "--device", "cpu")
    for key in ("added_tokens", "model"):
        checkpoint(f"bpe-no-{key}", bpe_edit(lambda d, key=key: d.pop(key)),
                   base=translator / "best", command=translate)
    for key in ("vocab", "merges", "type"):
        checkpoint(f"bpe-model-no-{key}", bpe_edit(lambda d, key=key: d["model"].pop(key)),
                   base=translator / "best", command=translate)
    checkpoint("bpe-vocab-empty", bpe_edit(lambda d: d["model"].__setitem__("vocab", {})),
               base=translator / "best", command=translate)
    checkpoint("bpe-merges-garbage", bpe_edit(lambda d: d["model"].__setitem__("merges", [[1]])),
               base=translator / "best", command=translate)
    checkpoint("bpe-ids-out-of-range", bpe_edit(lambda d: d["model"]["vocab"].update(
        {k: v + 10**6 for k, v in list(d["model"]["vocab"].items())[-5:]})),
        base=translator / "best", command=translate)
    # corpora and pair files
    corpora = {"empty": b"", "binary": b"\x00\x01\x02\x03binary" * 10,
               "not-utf8": b"caf\xe9 au lait\n" * 50, "only-newlines": b"\n" * 500,
               "too-small": b"just a few words.\n", "utf16": "anna said hello\n".encode("utf-16"),
               "nul-in-text": b"anna said \x00 hello\n" * 100}
    for label, data in corpora.items():
        path = folder / f"corpus-{label}.txt"
        path.write_bytes(data)
        cases.append((f"corpus-{label}", ["train", "lm", str(path), "--out",
                                          str(folder / f"run-{label}"), "--max-steps", "2",
                                          *TRAIN]))
    (folder / "corpus-dir").mkdir()
    cases.append(("corpus-folder", ["train", "lm", str(folder / "corpus-dir"), "--out",
                                    str(folder / "run-dir"), "--max-steps", "2"]))
    cases.append(("corpus-missing", ["train", "lm", str(folder / "nothing.txt"), "--out",
                                     str(folder / "run-missing"), "--max-steps", "2"]))
    pair_files = {"empty": b"", "one-column": b"just english\n" * 50,
                  "binary": b"\x00\x01\x02" * 100, "not-utf8": b"caf\xe9\tcaf\xe9\n" * 50}
    for label, data in pair_files.items():
        path = folder / f"pairs-{label}.tsv"
        path.write_bytes(data)
        cases.append((f"pairs-{label}", ["train", "translate", str(path), "--out",
                                         str(folder / f"tr-{label}"), "--max-steps", "2",
                                         "--preset", "tiny", "--strict", "--no-progress"]))
    # settings and resumes
    text = folder / "resume.txt"
    text.write_text(make_text(), encoding="utf-8")
    base_args = ["train", "lm", str(text), "--max-steps", "2", *TRAIN]
    for label, extra in {"max-steps-zero": ["--max-steps", "0"], "lr-negative": ["--lr", "-1"],
                         "lr-nan": ["--lr", "nan"], "batch-zero": ["--batch-size", "0"],
                         "seq-len-zero": ["--seq-len", "0"], "bad-device": ["--device", "tpu"],
                         "preset-unknown": ["--preset", "galactic"]}.items():
        cases.append((f"setting-{label}", [*base_args, "--out", str(folder / f"set-{label}"),
                                           *extra]))
    run = folder / "existing-run"
    from scriven.cli import main
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        if main([*base_args, "--out", str(run)]) != 0:
            raise RuntimeError("could not train the run the resume cases start from")
    cases.append(("fresh-run-over-a-run", [*base_args, "--out", str(run)]))
    cases.append(("resume-nothing", [*base_args, "--out", str(folder / "no-run"), "--resume"]))
    cases.append(("resume-changed-batch", [*base_args, "--out", str(run), "--resume",
                                           "--batch-size", "2"]))
    cases.append(("resume-changed-seed", [*base_args, "--out", str(run), "--resume",
                                          "--seed", "7"]))
    other = folder / "other.txt"
    other.write_text(make_text(seed=1), encoding="utf-8")
    cases.append(("resume-changed-data", ["train", "lm", str(other), "--max-steps", "2", *TRAIN,
                                          "--out", str(run), "--resume"]))
    for label, change in {
            "trainer-garbage": write("trainer.json", os.urandom(100)),
            "trainer-unknown-field": lambda t: (t / "trainer.json").write_text(json.dumps(
                {**json.loads((t / "trainer.json").read_text()), "progress": {"evil": 1}})),
            "state-garbage": write("state.safetensors", os.urandom(100)),
            "state-missing": remove("state.safetensors")}.items():
        copy = folder / f"resume-{label}"
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".lock"))
        change(copy / "latest")
        cases.append((f"resume-{label}", [*base_args, "--out", str(copy), "--resume"]))
    return cases


def run_crafted(cases: list[tuple[str, list[str]]]) -> dict:
    """Each case through `scriven.cli.main` in this process: an exception escaping it is what
    the command line would show as a traceback."""
    from scriven.cli import main
    tracebacks, not_refused, multi_line = [], [], []
    messages: dict[str, str] = {}
    for name, argv in cases:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse: usage line and one error line
                    code = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # noqa: BLE001 - counting exactly these
            tracebacks.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            continue
        lines = [x for x in err.getvalue().splitlines()
                 if x.strip() and not x.startswith(("usage:", "warning:", " "))]
        messages[name] = lines[-1] if lines else ""
        if code == 0:
            not_refused.append(name)
        elif len(lines) != 1 or not lines[0].startswith(("error:", "scriven")):
            multi_line.append(f"{name}: {err.getvalue()[:300]!r}")
    return {"crafted": len(cases), "tracebacks": len(tracebacks), "not_refused": not_refused,
            "not_one_line": multi_line, "traceback_cases": tracebacks, "messages": messages}


# ---------------------------------------------------------------------------------------------
# Serving


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _round(url: str, requests: int, concurrency: int, rng: random.Random) -> dict:
    import httpx
    codes: dict[int, int] = {}
    left_early = 0
    gate = asyncio.Semaphore(concurrency)
    prompts = ["anna said", "the prince looked at", "levin went to", "she smiled at the"]

    transport_errors = 0

    async def one(client: httpx.AsyncClient, leave: bool) -> None:
        nonlocal left_early, transport_errors
        body = {"prompt": rng.choice(prompts), "max_new_tokens": 12, "stream": True,
                "temperature": 0.8, "seed": rng.randrange(1000)}
        async with gate:
            for attempt in range(2):
                try:
                    async with client.stream("POST", url + "/v1/generate",
                                             content=json.dumps(body),
                                             headers={"Content-Type": "text/plain"}) as response:
                        codes[response.status_code] = codes.get(response.status_code, 0) + 1
                        async for _ in response.aiter_bytes():
                            if leave:
                                left_early += 1
                                break  # closing the stream here disconnects
                    return
                except httpx.TransportError:
                    # A pooled connection the server closed as idle just as it was reused:
                    # counted, and the request sent once more on a fresh connection.
                    transport_errors += 1
                    if attempt:
                        raise

    # Idle connections expire before uvicorn's 5 s keep-alive closes them from its side.
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=60, limits=limits) as c:
        await asyncio.gather(*(one(c, i % 10 == 9) for i in range(requests)))
    return {"codes": codes, "left_early": left_early, "transport_errors": transport_errors}


def serve_battery(lm: Path, requests: int, rounds: int, concurrency: int = 32) -> dict:
    import httpx
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "scriven", "serve", f"lm={lm}", "--port",
                               str(port), "--threads", "1", "--device", "cpu",
                               "--log-level", "error"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=ENV)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {server.stderr.read()[-500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        per_round = max(1, requests // rounds)
        asyncio.run(_round(url, min(per_round, 50), concurrency, rng))  # warm up, not counted
        rss_before = _rss_kib(server.pid)
        codes: dict[int, int] = {}
        rss, drained, left_early, transport_errors = [], True, 0, 0
        for _ in range(rounds):
            result = asyncio.run(_round(url, per_round, concurrency, rng))
            for code, n in result["codes"].items():
                codes[code] = codes.get(code, 0) + n
            left_early += result["left_early"]
            transport_errors += result["transport_errors"]
            wait = time.monotonic() + 30
            while True:
                model = httpx.get(url + "/healthz", timeout=5).json()["models"]["lm"]
                if model["queued"] == 0 and model["active"] == 0:
                    break
                if time.monotonic() > wait:
                    drained = False
                    break
                time.sleep(0.05)
            rss.append(_rss_kib(server.pid))
        served = sum(n for c, n in codes.items() if c < 400)
        refused = sum(n for c, n in codes.items() if 400 <= c < 500)
        spread = (max(rss) - min(rss)) / min(rss) if rss else 0.0
        return {"requests": per_round * rounds, "served": served, "refused": refused,
                "errors_5xx": sum(n for c, n in codes.items() if c >= 500),
                "status_codes": {str(c): n for c, n in sorted(codes.items())},
                "left_early": left_early, "transport_errors_retried": transport_errors,
                "queue_drained": drained,
                "rss_kib_before": rss_before, "rss_kib_after": rss[-1] if rss else rss_before,
                "rss_kib_per_round": rss, "rss_spread": round(spread, 4)}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


# ---------------------------------------------------------------------------------------------


def tiny_models(folder: Path) -> tuple[Path, Path]:
    import torch

    from scriven.lm import train_lm
    from scriven.translation import train_translate
    torch.set_num_threads(1)
    (folder / "text.txt").write_text(make_text(), encoding="utf-8")
    (folder / "pairs.tsv").write_text(make_pairs(), encoding="utf-8")
    train_lm(str(folder / "text.txt"), folder / "lm", preset="tiny", batch_size=4, seq_len=8,
             max_steps=20, eval_every=20, progress=False, device="cpu")
    train_translate(str(folder / "pairs.tsv"), folder / "translator", preset="tiny",
                    vocab_size=300, max_steps=5, max_tokens=512, warmup_steps=2, eval_every=5,
                    bleu_sentences=2, progress=False, device="cpu")
    return folder / "lm", folder / "translator"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--verbose", action="store_true", help="each crafted input's error")
    parser.add_argument("--skip", nargs="*", default=[], choices=["kills", "crafted", "serve"])
    a = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    started = time.time()
    summary: dict = {}
    with tempfile.TemporaryDirectory(prefix="scriven-faults-") as tmp:
        folder = Path(tmp)
        lm, translator = tiny_models(folder)
        parts = {"crafted": lambda: run_crafted(crafted_cases(lm, translator,
                                                              folder / "crafted")),
                 "kills": lambda: kill_battery(a.kills, folder / "kills"),
                 "serve": lambda: serve_battery(lm, a.requests, a.rounds)}
        for name, part in parts.items():
            if name in a.skip:
                continue
            (folder / name).mkdir()
            try:
                summary[name] = part()
            except Exception as e:  # noqa: BLE001 - one part failing must not hide the others
                summary[name] = {"error": f"{type(e).__name__}: {e}"}
        if "messages" in summary.get("crafted", {}) and not a.verbose:
            summary["crafted"].pop("messages")
    summary["seconds"] = round(time.time() - started, 1)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
