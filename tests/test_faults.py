"""Nothing lost, nothing trusted that should not be: runs survive kills and full disks, resumes
are exact or refused, damaged or hostile files are one-line errors, and the server stays up
under load. Marked `faults`; a short version runs by default, `--faults-long` (or
SCRIVEN_FAULTS_LONG=1) runs the long one. `bench/faults.py` is the full battery."""

from __future__ import annotations

import errno
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    TINY_LM,
    as_before_per_task_configs,
    crash_after,
    make_text,
    one_thread,
    weights,
)

from scriven import checkpoint as ckpt_io
from scriven import lm as lm_module
from scriven import train as train_module
from scriven.errors import ScrivenError
from scriven.lm import train_lm

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parent.parent
ARGS = dict(TINY_LM, device="cpu", amp="off")


def _bench():
    spec = importlib.util.spec_from_file_location("bench_faults", ROOT / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture
def long_run(request) -> bool:
    return bool(request.config.getoption("--faults-long", default=False)
                or os.environ.get("SCRIVEN_FAULTS_LONG"))


def _steps(run: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# Nothing lost


def test_a_fresh_run_into_a_used_folder_is_refused_unless_overwrite(tiny_text, tmp_path):
    run = tmp_path / "run"
    train_lm(str(tiny_text), run, max_steps=5, **ARGS)
    log = (run / "metrics.jsonl").read_text()
    best = (run / "best" / "model.safetensors").read_bytes()
    with pytest.raises(ScrivenError, match="already holds a training run.*--resume.*--overwrite"):
        train_lm(str(tiny_text), run, max_steps=5, seed=1, **ARGS)
    assert (run / "metrics.jsonl").read_text() == log
    assert (run / "best" / "model.safetensors").read_bytes() == best
    train_lm(str(tiny_text), run, max_steps=5, seed=1, overwrite=True, **ARGS)
    assert (run / "best" / "model.safetensors").read_bytes() != best


def test_the_cli_overwrite_flag_is_the_parameter(tiny_text, tmp_path, monkeypatch):
    seen = {}
    # wraps: the command line reads train_lm's signature (its defaults) through the stand-in
    monkeypatch.setattr(lm_module, "train_lm",
                        functools.wraps(lm_module.train_lm)(lambda *a, **kw: seen.update(kw)))
    from scriven import cli
    monkeypatch.setattr(cli, "_print_result", lambda result: None)
    cli.main(["train", "lm", str(tiny_text), "--out", str(tmp_path), "--overwrite"])
    assert seen["overwrite"] is True


def test_best_is_saved_before_latest(tiny_text, tmp_path, monkeypatch):
    """A kill between the two saves must leave `best` at least as new as what `latest`'s
    trainer state claims is the best score."""
    order = []
    real = ckpt_io.save
    monkeypatch.setattr(ckpt_io, "save", lambda path, ckpt: (order.append(Path(path).name),
                                                             real(path, ckpt))[1])
    train_lm(str(tiny_text), tmp_path / "run", max_steps=5, **ARGS)
    assert order[:2] == ["best", "latest"]


def test_resume_truncates_the_log_and_says_its_step(tiny_text, tmp_path, monkeypatch, capsys):
    args = dict(ARGS, max_steps=17, log_every=1)
    restore = crash_after(monkeypatch, lm_module.LMTask, steps=13)  # checkpoint at step 10
    with pytest.raises(KeyboardInterrupt):
        train_lm(str(tiny_text), tmp_path / "run", **args)
    restore()
    assert max(_steps(tmp_path / "run")) == 13
    capsys.readouterr()
    train_lm(str(tiny_text), tmp_path / "run", resume=True, **args)
    assert "resuming from step 10" in capsys.readouterr().err
    train_lines = [s for s, x in zip(_steps(tmp_path / "run"),
                                     (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
                   if '"loss"' in x]
    assert train_lines == list(range(1, 18))


@pytest.mark.parametrize("change, named", [
    (dict(batch_size=2), "batch_size 4 -> 2"), (dict(seq_len=4), "seq_len 8 -> 4"),
    (dict(seed=3), "seed 0 -> 3"), (dict(lr=1e-2), "lr"), (dict(amp="bf16"), "amp"),
    (dict(optimizer="muon"), "optimizer 'adamw' -> 'muon'"), ("text", "training data"),
])
def test_resume_refuses_changed_settings_or_data(tiny_text, tmp_path, change, named):
    run = tmp_path / "run"
    train_lm(str(tiny_text), run, max_steps=5, **ARGS)
    text = tiny_text
    if change == "text":
        text = tmp_path / "other.txt"
        text.write_text(make_text(seed=5), encoding="utf-8")
        change = {}
    with pytest.raises(ScrivenError, match=f"--resume: .*{named}"):
        train_lm(str(text), run, max_steps=10, resume=True, **{**ARGS, **change})
    # The budget may change: that is how a run is extended.
    train_lm(str(tiny_text), run, max_steps=10, resume=True, eval_every=3, **{
        k: v for k, v in ARGS.items() if k != "eval_every"})


def test_a_checkpoint_from_before_per_task_configs_resumes_exactly(tiny_text, tmp_path,
                                                                  monkeypatch):
    train_lm(str(tiny_text), tmp_path / "full", max_steps=10, **ARGS)
    run = tmp_path / "run"
    restore = crash_after(monkeypatch, lm_module.LMTask, steps=7)  # checkpoint at step 5
    with pytest.raises(KeyboardInterrupt):
        train_lm(str(tiny_text), run, max_steps=10, **ARGS)
    restore()
    as_before_per_task_configs(run)
    with pytest.raises(ScrivenError, match="--resume: .*seq_len 8 -> 4"):
        train_lm(str(tiny_text), run, max_steps=10, resume=True, **{**ARGS, "seq_len": 4})
    train_lm(str(tiny_text), run, max_steps=10, resume=True, **ARGS)
    full, resumed = weights(tmp_path / "full"), weights(run)
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert "max_tokens" not in json.loads((run / "latest" / "config.json").read_text())["train"]


def test_a_full_disk_keeps_the_previous_checkpoint(tiny_text, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train_lm(str(tiny_text), run, max_steps=5, **ARGS)
    before = weights(run)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_io, "save_file", full)
    with pytest.raises(ScrivenError, match="cannot write checkpoint .*the disk is full"):
        train_lm(str(tiny_text), run, max_steps=10, resume=True, **ARGS)
    monkeypatch.undo()
    after = weights(run)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.name.endswith(".tmp") for p in run.iterdir())
    train_lm(str(tiny_text), run, max_steps=10, resume=True, **ARGS)  # and it goes on


def test_a_full_disk_is_one_line_from_the_cli(tiny_text, tmp_path):
    script = textwrap.dedent(f"""
        import errno, sys
        from scriven import checkpoint
        def full(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        checkpoint.save_file = full
        from scriven.cli import main
        sys.exit(main(["train", "lm", {str(tiny_text)!r}, "--out", {str(tmp_path / "r")!r},
                       "--max-steps", "3", "--preset", "tiny", "--batch-size", "4",
                       "--seq-len", "8", "--no-progress", "--device", "cpu"]))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "the disk is full" in done.stderr and "Traceback" not in done.stderr


def test_checkpoint_directories_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = ckpt_io._fsync_dir
    monkeypatch.setattr(ckpt_io, "_fsync_dir", lambda p: (synced.append(Path(p)), real(p))[1])
    ckpt = ckpt_io.Checkpoint("lstm", {"model": {}}, {"w": torch.zeros(2)}, "{}")
    ckpt_io.save(tmp_path / "latest", ckpt)
    assert tmp_path / "latest.tmp" in synced  # its files before the rename
    assert tmp_path in synced                 # the rename itself


def test_a_second_run_into_a_locked_folder_is_refused(tiny_text, tmp_path):
    run = tmp_path / "run"
    with train_module.RunLock(run):
        with pytest.raises(ScrivenError, match="in use by another training run"):
            train_lm(str(tiny_text), run, max_steps=3, **ARGS)
    train_lm(str(tiny_text), run, max_steps=3, **ARGS)  # the lock goes with the run


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, long_run):
    report = _bench().kill_battery(20 if long_run else 2, tmp_path, steps=120)
    assert report["survived"] == report["kills"]
    assert report["exact_resumes"] == report["kills"], report


# ---------------------------------------------------------------------------------------------
# Nothing trusted


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crafted")
    bench = _bench()
    lm, translator = bench.tiny_models(folder)
    (folder / "cases").mkdir()
    return bench, bench.crafted_cases(lm, translator, folder / "cases"), lm


def test_crafted_checkpoints_and_corpora_are_one_line_errors(crafted):
    bench, cases, _ = crafted
    assert len(cases) >= 60
    report = bench.run_crafted(cases)
    assert report["traceback_cases"] == []
    assert report["not_refused"] == []
    assert report["not_one_line"] == []


@pytest.mark.parametrize("name", ["vocab-1e12-int", "tokenizer-random-bytes", "config-nested",
                                  "format-newer", "tokenizer-fewer-tokens"])
def test_crafted_inputs_through_the_real_command_line(crafted, name):
    _, cases, _ = crafted
    argv = dict(cases)[name]
    done = subprocess.run([sys.executable, "-m", "scriven", *argv], capture_output=True,
                          text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stderr.startswith("error:")


def test_a_huge_vocabulary_is_refused_before_any_allocation(tiny_text, tmp_path):
    train_lm(str(tiny_text), tmp_path / "run", max_steps=3, **ARGS)
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    config["model"]["vocab_size"] = 10**12
    (tmp_path / "run" / "best" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScrivenError, match=r"shape \(1000000000000, .*model.safetensors holds"):
        ckpt_io.load_model(tmp_path / "run" / "best", torch.device("cpu"), ("lstm",))


def test_an_unreadable_tokenizer_is_a_clear_error(tiny_text, tmp_path, monkeypatch):
    train_lm(str(tiny_text), tmp_path / "run", max_steps=3, **ARGS)
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "tokenizer.json":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(ScrivenError, match="cannot read tokenizer.json"):
        ckpt_io.load(tmp_path / "run")


def test_a_checkpoint_from_a_newer_format_is_refused(tiny_text, tmp_path):
    train_lm(str(tiny_text), tmp_path / "run", max_steps=3, **ARGS)
    config = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert config["format"] == ckpt_io.FORMAT_VERSION
    config["format"] = ckpt_io.FORMAT_VERSION + 1
    (tmp_path / "run" / "best" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ScrivenError, match="newer than this scriven"):
        ckpt_io.load(tmp_path / "run" / "best")


# ---------------------------------------------------------------------------------------------
# The server


@pytest.fixture(scope="module")
def app_for(crafted):
    pytest.importorskip("fastapi")
    from scriven.serve import create_app
    apps = []

    def make(**kwargs):
        app = create_app({"lm": crafted[2]}, device="cpu", **kwargs)
        apps.append(app)
        return app

    yield make
    for app in apps:
        for m in app.state.models.values():
            m.worker.close()


GENERATE = {"prompt": "anna said", "max_new_tokens": 3, "seed": 0}


def test_the_server_answers_only_allowed_hosts(app_for):
    from fastapi.testclient import TestClient
    app = app_for()
    for base in ("http://127.0.0.1:8000", "http://localhost", "http://[::1]:8000"):
        with TestClient(app, base_url=base) as c:
            assert c.get("/healthz").status_code == 200, base
    with TestClient(app, base_url="http://evil.example") as c:
        refused = c.post("/v1/generate", json=GENERATE)
        assert refused.status_code == 400 and "--allowed-hosts" in refused.json()["detail"]
    app = app_for(allowed_hosts=["*.example.com"])
    with TestClient(app, base_url="http://api.example.com") as c:
        assert c.post("/v1/generate", json=GENERATE).status_code == 200


def test_an_api_key_is_required_when_set(app_for):
    from fastapi.testclient import TestClient
    with TestClient(app_for(api_key="s3cret-key"), base_url="http://127.0.0.1") as c:
        assert c.get("/healthz").status_code == 200
        missing = c.post("/v1/generate", json=GENERATE)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = c.post("/v1/generate", json=GENERATE, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = c.post("/v1/generate", json=GENERATE,
                       headers={"Authorization": "Bearer s3cret-key"})
        assert right.status_code == 200


def test_the_cli_and_environment_pass_the_api_key_and_hosts(monkeypatch):
    from scriven import cli
    from scriven.serve import app as app_module
    seen = {}
    monkeypatch.setattr(app_module, "create_app", lambda *a: seen.update(args=a) or
                        (_ for _ in ()).throw(ScrivenError("stop here")))
    monkeypatch.setenv("SCRIVEN_API_KEY", "from-the-env")
    assert cli.main(["serve", "x", "--allowed-hosts", "a.example", "b.example"]) == 2
    assert seen["args"][-2:] == (["a.example", "b.example"], "from-the-env")
    assert cli.main(["serve", "x", "--api-key", "from-the-flag", "--host", "10.0.0.5"]) == 2
    assert seen["args"][-2:] == (["localhost", "127.0.0.1", "::1", "10.0.0.5"], "from-the-flag")


def test_models_are_listed_by_name_not_path(app_for, crafted):
    from fastapi.testclient import TestClient
    with TestClient(app_for(), base_url="http://127.0.0.1") as c:
        listing = c.get("/v1/models").text
    assert "lm" in listing and str(crafted[2]) not in listing and '"path"' not in listing


def test_a_full_queue_is_429_with_retry_after(app_for, monkeypatch):
    from fastapi.testclient import TestClient

    from scriven.serve.batching import QueueFull
    app = app_for()

    def full(job):
        raise QueueFull("1024 requests are waiting; try again shortly")

    monkeypatch.setattr(app.state.models["lm"].worker, "submit", full)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        busy = c.post("/v1/generate", json=GENERATE)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded",
                                          "text/plain", "application/json"])
def test_a_json_body_is_read_whatever_its_content_type(app_for, content_type):
    """curl -d sends application/x-www-form-urlencoded."""
    from fastapi.testclient import TestClient
    headers = {} if content_type is None else {"Content-Type": content_type}
    with TestClient(app_for(), base_url="http://127.0.0.1") as c:
        done = c.post("/v1/generate", content=json.dumps(GENERATE), headers=headers)
    assert done.status_code == 200, done.text
    assert done.json()["model"] == "lm"


def test_a_loaded_server_gives_no_5xx_drains_and_keeps_its_memory(crafted, tmp_path, long_run):
    bench, _, lm = crafted
    rounds, requests = (5, 2000) if long_run else (3, 120)
    report = bench.serve_battery(lm, requests, rounds, concurrency=16)
    assert report["errors_5xx"] == 0, report
    assert report["queue_drained"], report
    assert report["served"] + report["refused"] == report["requests"]
    assert report["left_early"] > 0
    if long_run:
        assert report["rss_spread"] <= 0.10, report


# ---------------------------------------------------------------------------------------------
# Distributed


def test_a_skewed_clock_on_one_rank_cannot_hang_a_timed_run(tiny_text, tmp_path):
    """Rank 1's clock runs 20x fast: deciding on its own it would stop long before rank 0 and
    leave rank 0 waiting in a collective. Rank 0 decides for both."""
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    script = tmp_path / "skewed.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys, time
        from scriven import train
        if os.environ["RANK"] == "1":
            real, start = time.perf_counter, time.perf_counter()
            class Clock:
                def __getattr__(self, name):
                    return getattr(time, name)
                def perf_counter(self):
                    return start + (real() - start) * 20
            train.time = Clock()
        from scriven.cli import main
        sys.exit(main(["train", "lm", {str(tiny_text)!r}, "--out", {str(tmp_path / "run")!r},
                       "--minutes", "0.08", "--preset", "tiny", "--batch-size", "2",
                       "--seq-len", "8", "--log-every", "1", "--eval-every", "1000000",
                       "--no-progress", "--device", "cpu", "--amp", "off"]))
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        done = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2", str(script)],
                              capture_output=True, text=True, env=env, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks disagreed about when to stop and hung")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["steps"] > 0
