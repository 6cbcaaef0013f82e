"""Serving exports: an exported LSTM or GPT (ONNX Runtime) and translator (CTranslate2) answer through
the same routes as checkpoints, with what the library gives for the same export; what a runtime
cannot give (attention maps, its position table) is said, not left empty; a bad directory, an
export of a newer scriven and a missing runtime package are one-line errors."""

from __future__ import annotations

import json
import sys
import threading

import pytest
from conftest import make_text, one_thread

from scriven.export import EXPORT_VERSION, export

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import events, trained_models  # noqa: E402

from scriven.cli import main  # noqa: E402
from scriven.serve import ServeLimits, create_app  # noqa: E402

# Only the tests that run a model need the runtimes; the errors are checked without them.
RUNTIME_REASON = "serving exports needs {} (pip install 'scriven[export]')"


def needs(*packages: str) -> None:
    for package in packages:
        pytest.importorskip(package, reason=RUNTIME_REASON.format(package))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """The tiny trained LSTM and translator of test_serve, exported (float32)."""
    needs("onnx", "onnxruntime", "ctranslate2")
    lm, tr = trained_models(tmp_path_factory)
    root = tmp_path_factory.mktemp("exports")
    return (export(lm, "onnx", root / "lm-onnx"),
            export(tr, "ctranslate2", root / "fr-ct2"))


@pytest.fixture(scope="module")
def client(exports):
    app = create_app({"lm": exports[0], "fr": exports[1]},
                     limits=ServeLimits(max_new_tokens=64, max_beam=4, max_sentences=4))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def test_models_says_which_runtime_serves_each_export(client):
    served = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert served["lm"]["task"] == "generate" and served["lm"]["kind"] == "lstm"
    assert served["lm"]["runtime"] == "onnxruntime" and served["lm"]["precision"] == "float32"
    assert served["fr"]["task"] == "translate" and served["fr"]["runtime"] == "ctranslate2"
    assert served["fr"]["attention_maps"] is False and served["fr"]["parameters"] is None
    assert served["fr"]["config"]["d_model"] == 32  # the export's model config
    assert client.get("/").status_code == 200  # the same playground


# ---------------------------------------------------------------------------------------------
# An exported LSTM


def test_exported_lstm_greedy_equals_the_library(client, exports):
    from scriven.generation import generate
    body = client.post("/v1/generate", json={"prompt": "anna said", "max_new_tokens": 12,
                                             "temperature": 0, "alternatives": 2}).json()
    expected = generate(exports[0], "anna said", max_new_tokens=12, temperature=0)[0]
    sample = body["samples"][0]
    assert body["prompt"] + sample["generated"] == expected
    assert sample["generated_tokens"] == 12
    assert all(t["alternatives"][0][0] == t["token"] for t in sample["tokens"])


@pytest.mark.parametrize("settings", [{"temperature": 0.9, "top_k": 10},
                                      {"temperature": 1.2, "top_p": 0.8,
                                       "repetition_penalty": 1.3}])
def test_exported_lstm_seeded_sampling_equals_the_library(client, exports, settings):
    from scriven.generation import generate
    request = {"prompt": "the prince", "max_new_tokens": 12, "seed": 7, "num_samples": 2,
               **settings}
    body = client.post("/v1/generate", json=request).json()
    expected = generate(exports[0], "the prince", max_new_tokens=12, seed=7, num_samples=2,
                        **settings)
    assert [body["prompt"] + s["generated"] for s in body["samples"]] == expected
    streamed = events(client.post("/v1/generate", json={**request, "stream": True}))
    assert streamed[-1][0] == "done"
    for s in range(2):
        text = "".join(d["text"] for k, d in streamed if k == "token" and d["sample"] == s)
        assert body["prompt"] + text == expected[s]


# ---------------------------------------------------------------------------------------------
# An exported translator


SENTENCES = ["the big dog sleeps.", "a cat.", "the old red car runs and the child reads."]


def test_exported_translator_equals_the_library(client, exports):
    from scriven.translator import translate
    greedy = client.post("/v1/translate", json={"text": SENTENCES}).json()["translations"]
    assert [t["text"] for t in greedy] == translate(exports[1], SENTENCES)
    short = client.post("/v1/translate", json={"text": SENTENCES, "max_len": 4}).json()
    assert [t["text"] for t in short["translations"]] == translate(exports[1], SENTENCES,
                                                                    max_len=4)
    beams = client.post("/v1/translate", json={"text": SENTENCES[0], "beam": 3, "n_best": 2,
                                               "length_penalty": 0.0}).json()["translations"][0]
    expected = translate(exports[1], SENTENCES[0], beam=3, n_best=2, length_penalty=0.0)
    assert [(h["text"], pytest.approx(h["score"], abs=1e-5)) for h in beams["hypotheses"]] == \
        expected


def test_attention_of_an_exported_translator_says_it_is_unavailable(client):
    body = client.post("/v1/translate", json={"text": SENTENCES[:2], "attention": True}).json()
    for t in body["translations"]:
        assert t["text"] and t["attention"]["available"] is False
        assert "CTranslate2 export" in t["attention"]["reason"] and "cross" not in t["attention"]
    found = events(client.post("/v1/translate", json={"text": SENTENCES[:2], "attention": True,
                                                      "stream": True}))
    assert [k for k, _ in found][0] == "start" and found[-1][0] == "done"
    sentences = [d for k, d in found if k == "translation"]
    assert len(sentences) == 2 and all(d["attention"]["available"] is False for d in sentences)


def test_a_checkpoint_translator_says_its_attention_is_available(tmp_path_factory):
    _, tr = trained_models(tmp_path_factory)
    with TestClient(create_app({"fr": tr}), base_url="http://127.0.0.1") as c:
        found = c.post("/v1/translate", json={"text": "a cat.", "attention": True}).json()
        assert c.get("/v1/models").json()["models"][0]["attention_maps"] is True
    attention = found["translations"][0]["attention"]
    assert attention["available"] is True and attention["cross"]


def test_positions_of_an_export_are_refused_by_name(client):
    refused = client.get("/v1/positions", params={"length": 5, "model": "fr"})
    assert refused.status_code == 422 and "ctranslate2 export" in refused.text
    assert client.get("/v1/positions", params={"length": 5}).status_code == 200


# ---------------------------------------------------------------------------------------------
# What cannot be served


@pytest.fixture(scope="module")
def gpts(tmp_path_factory):
    """A GPT checkpoint (random weights, max_len 16) and its ONNX export."""
    needs("onnx", "onnxruntime")
    from test_export import GPT_CONFIGS, save_random

    from scriven.tokenizers import WordTokenizer
    tok = WordTokenizer.train(make_text(50))
    root = tmp_path_factory.mktemp("gpt")
    save_random(root / "gpt", "gpt", dict(GPT_CONFIGS["learned"], vocab_size=tok.vocab_size),
                tok, scale=0.05)
    return root / "gpt", export(root / "gpt", "onnx", root / "gpt-onnx")


@pytest.mark.parametrize("which", [0, 1], ids=["checkpoint", "onnx"])
def test_a_gpt_is_served_as_the_library_generates_it(gpts, which):
    """Requests with prompts of different lengths run at once: their caches differ in length,
    so they step as separate groups, and 30 new tokens run each group past max_len 16 (its
    newest half is read again) at a different step."""
    from scriven.generation import generate
    path = gpts[which]
    app = create_app({"gpt": path}, limits=ServeLimits(max_new_tokens=30))
    requests = [{"prompt": prompt, "max_new_tokens": 30, "seed": 5 + i, "num_samples": 2,
                 "temperature": 0.9, "top_k": 20}
                for i, prompt in enumerate(["anna said", "the prince and kitty", "levin"])]
    results: list[dict] = [{} for _ in requests]
    with TestClient(app, base_url="http://127.0.0.1") as c:
        def call(i: int) -> None:
            results[i] = c.post("/v1/generate", json=requests[i]).json()

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        greedy = c.post("/v1/generate", json={"prompt": "anna said", "max_new_tokens": 30,
                                              "temperature": 0}).json()
    for request, body in zip(requests, results):
        settings = {k: v for k, v in request.items() if k != "prompt"}
        expected = generate(path, request["prompt"], device="cpu", **settings)
        assert [body["prompt"] + s["generated"] for s in body["samples"]] == expected
    expected = generate(path, "anna said", max_new_tokens=30, temperature=0, device="cpu")
    assert greedy["prompt"] + greedy["samples"][0]["generated"] == expected[0]
    assert app.state.models["gpt"].worker.peak_rows > 2  # requests ran side by side


def write_export(path, kind="lstm", format="onnx", version=EXPORT_VERSION):
    """An export directory as far as export.json goes: enough to reach the runtime check,
    with or without the runtime installed."""
    path.mkdir()
    (path / "export.json").write_text(json.dumps({
        "scriven_export": version, "scriven_version": "9.9.9", "kind": kind, "format": format,
        "quantization": "float32", "model": {}, "data": {}}))
    return path


def serve_error(path, capsys) -> str:
    """`scriven serve PATH`'s one-line error (it must fail before listening)."""
    assert main(["serve", str(path), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_cli_serve_names_a_directory_that_is_neither_checkpoint_nor_export(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    err = serve_error(tmp_path / "notes", capsys)
    assert "neither a scriven checkpoint (no config.json) nor an export (no export.json)" in err


def test_cli_serve_refuses_an_export_of_a_newer_scriven(tmp_path, capsys):
    out = write_export(tmp_path / "future", version=EXPORT_VERSION + 1)
    err = serve_error(out, capsys)
    assert "exported by scriven 9.9.9" in err and "upgrade scriven or export again" in err


@pytest.mark.parametrize("kind, format, package", [("lstm", "onnx", "onnxruntime"),
                                                   ("transformer", "ctranslate2", "ctranslate2")])
def test_cli_serve_names_a_missing_runtime_package(kind, format, package, tmp_path, capsys,
                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # what an import finds uninstalled
    out = write_export(tmp_path / "export", kind, format)
    err = serve_error(out, capsys)
    assert f"needs the Python package {package!r}" in err and "scriven[export]" in err
