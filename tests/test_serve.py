"""The HTTP server: validation, limits, streaming, batching, cancellation, and that what it
answers is what the library computes."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import make_text, one_thread

from scriven.errors import ScrivenError
from scriven.sampling import filter_logits

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from scriven.sampling import sample_rows  # noqa: E402
from scriven.serve import ServeLimits, create_app  # noqa: E402


def make_pairs(n: int = 400, seed: int = 0) -> str:
    """Tiny English→French pairs with enough distinct sources for a 90/5/5 split."""
    rng = random.Random(seed)
    nouns = {"cat": "chat", "dog": "chien", "house": "maison", "man": "homme",
             "woman": "femme", "child": "enfant", "book": "livre", "car": "voiture"}
    adjectives = {"big": "grand", "small": "petit", "red": "rouge", "old": "vieux"}
    verbs = {"sleeps": "dort", "eats": "mange", "runs": "court", "sings": "chante",
             "reads": "lit"}
    lines = []
    for _ in range(n):
        noun, adj, verb = rng.choice(list(nouns)), rng.choice(list(adjectives)), rng.choice(list(verbs))
        lines.append(f"the {adj} {noun} {verb}.\tle {nouns[noun]} {adjectives[adj]} {verbs[verb]}.")
    return "\n".join(lines) + "\n"


def trained_models(tmp_path_factory, translator_steps: int = 40) -> tuple[Path, Path]:
    """A tiny LSTM LM and a tiny translator, trained once per test session (a few seconds) and
    shared by the serve, browser and plot tests."""
    from scriven.lm import train_lm
    from scriven.translation import train_translate

    base = tmp_path_factory.getbasetemp() / "tiny-models"
    lm, tr = base / "lm", base / "translator"
    if not (base / "done").exists():
        base.mkdir(exist_ok=True)
        (base / "tiny.txt").write_text(make_text(), encoding="utf-8")
        (base / "pairs.tsv").write_text(make_pairs(), encoding="utf-8")
        with one_thread():
            train_lm(str(base / "tiny.txt"), lm, preset="tiny", batch_size=4, seq_len=8,
                     max_steps=40, lr=1e-2, eval_every=40, progress=False)
            train_translate(str(base / "pairs.tsv"), tr, preset="tiny", vocab_size=300,
                            max_steps=translator_steps, max_tokens=512, lr=3e-3,
                            warmup_steps=10, eval_every=translator_steps, bleu_sentences=5,
                            progress=False)
        (base / "done").write_text("ok")
    return lm, tr


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return trained_models(tmp_path_factory)


@pytest.fixture(scope="module")
def client(models):
    app = create_app([str(models[0]), f"fr={models[1]}"],
                     limits=ServeLimits(max_new_tokens=64, max_beam=4, max_sentences=4,
                                        max_body_bytes=4096))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def events(response) -> list[tuple[str, dict]]:
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


# ---------------------------------------------------------------------------------------------
# Basics


def test_health_models_docs_and_playground(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and set(health["models"]) == {"lm", "fr"}
    served = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert served["lm"]["task"] == "generate" and served["lm"]["kind"] == "lstm"
    assert served["fr"]["task"] == "translate" and served["fr"]["parameters"] > 0
    schema = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/translate", "/v1/models", "/healthz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and 'id="generate-form"' in page.text
    for name in ("app.js", "app.css"):
        static = client.get(f"/static/{name}")
        assert static.status_code == 200
        # Everything local: no CDN, no external fonts or scripts.
        assert "http://" not in static.text and "https://" not in static.text
    assert "http://" not in page.text and "https://" not in page.text


# ---------------------------------------------------------------------------------------------
# Generation


def test_greedy_generation_equals_the_library(client, models):
    from scriven.generation import generate
    body = client.post("/v1/generate", json={"prompt": "anna said", "max_new_tokens": 12,
                                             "temperature": 0, "alternatives": 3}).json()
    expected = generate(models[0], "anna said", max_new_tokens=12, temperature=0)[0]
    sample = body["samples"][0]
    assert body["prompt"] + sample["generated"] == expected
    assert sample["finish_reason"] == "length" and sample["generated_tokens"] == 12
    tokens = sample["tokens"]
    assert len(tokens) == 12 and all(len(t["alternatives"]) == 3 for t in tokens)
    # Greedy: the chosen token is the most likely one.
    assert all(t["alternatives"][0][0] == t["token"] for t in tokens)
    assert all(t["alternatives"][0][1] == pytest.approx(t["probability"]) for t in tokens)


@pytest.mark.parametrize("settings", [{"temperature": 0.9, "top_k": 10},
                                      {"temperature": 1.2, "top_p": 0.8},
                                      {"temperature": 1.0, "repetition_penalty": 1.3}])
def test_seeded_sampling_equals_the_library(client, models, settings):
    from scriven.generation import generate
    body = client.post("/v1/generate", json={"prompt": "the prince", "max_new_tokens": 12,
                                             "seed": 11, "num_samples": 2, **settings}).json()
    expected = generate(models[0], "the prince", max_new_tokens=12, seed=11, num_samples=2,
                        **settings)
    assert [body["prompt"] + s["generated"] for s in body["samples"]] == expected


def test_streaming_yields_the_same_text_as_the_plain_answer(client):
    request = {"prompt": "the prince", "max_new_tokens": 10, "seed": 7, "temperature": 0.9,
               "top_k": 10, "alternatives": 2}
    plain = client.post("/v1/generate", json=request).json()
    streamed = client.post("/v1/generate", json={**request, "stream": True})
    assert streamed.headers["content-type"].startswith("text/event-stream")
    found = events(streamed)
    kinds = [k for k, _ in found]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("token") == 10
    text = "".join(d["text"] for k, d in found if k == "token")
    assert text == plain["samples"][0]["generated"]
    assert all(0 < d["probability"] <= 1 for k, d in found if k == "token")


def test_seeded_requests_repeat_even_when_batched_with_others(client):
    request = {"prompt": "kitty", "max_new_tokens": 15, "num_samples": 2}
    results: list[list[tuple]] = [[] for _ in range(8)]

    def texts(body: dict) -> list[tuple]:
        return [(s["generated"], [t["id"] for t in s["tokens"]]) for s in body["samples"]]

    def call(i: int) -> None:  # seeds 3 and 4, in parallel: decoded in shared batches
        results[i] = texts(client.post("/v1/generate", json={**request, "seed": 3 + i % 2}).json())

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    alone = texts(client.post("/v1/generate", json={**request, "seed": 3}).json())
    assert results[0::2] == [alone] * 4
    assert results[1::2] == [results[1]] * 4 and results[1] != alone
    assert alone[0] != alone[1]  # the two samples of one request differ


def test_concurrent_requests_are_decoded_as_one_batch(models):
    app = create_app([models[0]], limits=ServeLimits(max_new_tokens=64))
    worker = app.state.models["lm"].worker
    with TestClient(app, base_url="http://127.0.0.1") as c:
        threads = [threading.Thread(target=c.post, args=("/v1/generate",),
                                    kwargs={"json": {"prompt": "anna", "max_new_tokens": 60}})
                   for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert worker.peak_rows > 1  # several requests advanced by one model call
    assert worker.steps < 12 * 60


def test_per_row_sampling_follows_the_library_filters():
    torch.manual_seed(0)
    logits = torch.randn(6, 30) * 3
    temperature = torch.tensor([0.7, 1.0, 0.0, 1.3, 0.5, 2.0])
    top_k = torch.tensor([30, 5, 30, 1, 12, 30])
    top_p = torch.tensor([0.9, 1.0, 1.0, 1.0, 0.5, 1.0])
    ids, probs, (alt_p, alt_i) = sample_rows(logits, temperature, top_k, top_p,
                                             torch.rand(6), alternatives=30)
    for r in range(6):
        t = float(temperature[r])
        if t == 0:
            assert ids[r] == logits[r].argmax()
            expected = torch.softmax(logits[r], -1)
        else:
            k = int(top_k[r]) if top_k[r] < 30 else None
            p = float(top_p[r]) if top_p[r] < 1 else None
            expected = torch.softmax(filter_logits(logits[r:r + 1], t, k, p)[0], -1)
        got = torch.zeros(30).scatter(0, alt_i[r], alt_p[r])
        assert torch.allclose(got, expected, atol=1e-6)
        assert expected[ids[r]] > 0 and probs[r] == pytest.approx(float(expected[ids[r]]), abs=1e-6)
    assert ids[3] == logits[3].argmax()  # top-k 1 is greedy


def test_inverse_cdf_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0 + 1e-12]]).repeat(4000, 1))
    ones = torch.ones(4000)
    ids, _, _ = sample_rows(logits, ones, torch.full((4000,), 4), ones,
                            torch.rand(4000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(ids, minlength=4).float() / 4000
    assert torch.allclose(freq[:3], torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


# ---------------------------------------------------------------------------------------------
# Validation and limits


@pytest.mark.parametrize("change, field", [
    ({"top_k": 0}, "top_k"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 65}, "max_new_tokens"),  # over this server's cap
    ({"prompt": ""}, "prompt"),
    ({"num_samples": 99}, "num_samples"),
    ({"tempurature": 1}, "tempurature"),  # a typo is refused, not ignored
])
def test_bad_generation_parameters_get_422_naming_the_field(client, change, field):
    response = client.post("/v1/generate", json={"prompt": "anna", **change})
    assert response.status_code == 422
    assert any(field in d["loc"] for d in response.json()["detail"])


def test_library_checks_also_answer_422(client):
    response = client.post("/v1/generate", json={"prompt": "anna", "top_k": 10**6})
    assert response.status_code == 422 and "top_k" in response.json()["detail"][0]["msg"]
    response = client.post("/v1/translate", json={"text": "   "})
    assert response.status_code == 422 and "empty" in response.json()["detail"][0]["msg"]


@pytest.mark.parametrize("change, field", [
    ({"beam": 9}, "beam"),
    ({"beam": 2, "n_best": 3}, "n_best"),
    ({"text": ["a."] * 5}, "text"),
    ({"length_penalty": -1}, "length_penalty"),
])
def test_bad_translation_parameters_get_422(client, change, field):
    response = client.post("/v1/translate", json={"text": "the cat eats.", **change})
    assert response.status_code == 422
    assert field in json.dumps(response.json()["detail"])


def test_unknown_or_wrong_model(client):
    assert client.post("/v1/generate", json={"prompt": "a", "model": "nope"}).status_code == 404
    wrong = client.post("/v1/generate", json={"prompt": "a", "model": "fr"})
    assert wrong.status_code == 422 and "translate" in wrong.text


def test_oversized_bodies_get_413(client):
    big = {"prompt": "anna " * 2000}
    assert client.post("/v1/generate", json=big).status_code == 413

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000
    response = client.post("/v1/generate", content=chunks(),
                           headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_a_request_over_its_time_limit_gets_504(models):
    app = create_app([models[0]], limits=ServeLimits(max_new_tokens=100_000,
                                                     request_timeout=0.05))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        response = c.post("/v1/generate", json={"prompt": "anna", "max_new_tokens": 100_000})
        assert response.status_code == 504
        streamed = c.post("/v1/generate", json={"prompt": "anna", "max_new_tokens": 100_000,
                                                "stream": True})
        kind, data = events(streamed)[-1]
        assert kind == "error" and data["status"] == 504


# ---------------------------------------------------------------------------------------------
# Translation


def test_translation_equals_the_library_and_attention_is_its_own(client, models):
    from scriven.translator import attention, translate
    sentences = ["the big dog sleeps.", "the old cat eats a book."]
    body = client.post("/v1/translate", json={"text": sentences, "attention": True}).json()
    got = body["translations"]
    assert [t["text"] for t in got] == translate(models[1], sentences)
    for t, sentence in zip(got, sentences):
        cross = torch.tensor(t["attention"]["cross"])                      # (L, H, T, S)
        assert torch.allclose(cross.sum(-1), torch.ones(cross.shape[:-1]), atol=1e-3)
        expected = attention(models[1], sentence)
        assert t["attention"]["source_tokens"] == expected.source_tokens
        if len(t["tokens"]) + 1 < 64:  # not cut at the model's length limit
            assert torch.allclose(cross, expected.cross, atol=1e-4)
    beams = client.post("/v1/translate", json={"text": sentences[0], "beam": 3,
                                               "n_best": 2}).json()["translations"][0]
    expected = translate(models[1], sentences[0], beam=3, n_best=2)
    assert [(h["text"], pytest.approx(h["score"], abs=1e-4)) for h in beams["hypotheses"]] == \
        [(text, score) for text, score in expected]


def test_greedy_translation_of_several_sentences_equals_the_library(client, models):
    from scriven.translator import translate
    sentences = ["the big dog sleeps.", "a cat.", "the old red car runs and the child reads."]
    got = client.post("/v1/translate", json={"text": sentences, "max_len": 6}).json()
    assert [t["text"] for t in got["translations"]] == translate(models[1], sentences, max_len=6)


def test_attention_for_too_many_numbers_is_refused_with_413(models):
    app = create_app([f"fr={models[1]}"])
    worker = app.state.models["fr"].worker
    with TestClient(app, base_url="http://127.0.0.1") as c:
        request = {"text": ["the big dog sleeps.", "the old cat eats a book."], "attention": True}
        assert c.post("/v1/translate", json=request).status_code == 200
        worker.max_attention_floats = 1000
        refused = c.post("/v1/translate", json=request)
        assert refused.status_code == 413 and "attention" in refused.json()["detail"]
        assert c.post("/v1/translate", json={**request, "attention": False}).status_code == 200


def test_a_beam_search_stops_when_its_request_times_out(models, monkeypatch):
    from scriven.tokenizers import EOS_ID
    app = create_app([f"fr={models[1]}"], limits=ServeLimits(request_timeout=0.25))
    model = app.state.models["fr"].loaded.model
    steps, decode_step = [], model.decode_step

    def slow_endless_step(*args, **kwargs):  # 0.1 s a step, and never <eos>
        steps.append(1)
        time.sleep(0.1)
        return decode_step(*args, **kwargs).index_fill(-1, torch.tensor([EOS_ID]), -1e9)

    monkeypatch.setattr(model, "decode_step", slow_endless_step)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        request = {"text": "the old cat eats a book.", "beam": 4, "max_len": 30}
        assert c.post("/v1/translate", json=request).status_code == 504
        time.sleep(0.3)  # the worker's last step
    assert len(steps) <= 5  # of the 30 it would have taken


def test_translation_streams_tokens_then_the_sentence(client):
    found = events(client.post("/v1/translate", json={"text": ["the cat eats.", "a dog runs."],
                                                       "stream": True}))
    kinds = [k for k, _ in found]
    assert kinds[0] == "start" and kinds[-1] == "done"
    assert sorted(d["index"] for k, d in found if k == "translation") == [0, 1]
    for index in (0, 1):
        final = next(d for k, d in found if k == "translation" and d["index"] == index)
        steps = [d["text"] for k, d in found if k == "token" and d["index"] == index]
        assert len(steps) == len(final["tokens"])
        assert not steps or steps[-1] == final["text"]


def test_positions_endpoint_gives_the_model_table(client):
    from scriven.models.transformer import sinusoidal_positions
    data = client.get("/v1/positions", params={"length": 10, "dims": 8}).json()
    assert torch.allclose(torch.tensor(data["encoding"]), sinusoidal_positions(10, 8), atol=1e-4)
    assert client.get("/v1/positions", params={"length": 0}).status_code == 422
    own = client.get("/v1/positions", params={"length": 5, "model": "fr"}).json()
    assert own["dims"] == 32  # the tiny translator's d_model


# ---------------------------------------------------------------------------------------------
# A real server: disconnects and the command line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn on 127.0.0.1 in a background thread; stops on exit."""

    def __init__(self, app) -> None:
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def test_a_client_that_disconnects_stops_its_generation(models):
    import httpx
    app = create_app([models[0]], limits=ServeLimits(max_new_tokens=1_000_000))
    worker = app.state.models["lm"].worker
    with ServerThread(app) as server, httpx.Client(base_url=server.url, timeout=10) as http:
        with http.stream("POST", "/v1/generate", json={"prompt": "anna", "stream": True,
                                                        "max_new_tokens": 1_000_000}) as r:
            lines = r.iter_lines()
            while next(lines) != "event: token":  # the start event says "prompt_tokens"
                pass
        deadline = time.monotonic() + 5
        while worker.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.active == 0
        steps = worker.steps
        assert steps > 0
        time.sleep(0.2)
        assert worker.steps == steps  # nothing is decoding for nobody
        assert steps < 1_000_000
        # Without streaming too: the client gives up waiting and closes the connection.
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/generate", json={"prompt": "anna", "max_new_tokens": 1_000_000},
                      timeout=httpx.Timeout(10, read=0.3))
        deadline = time.monotonic() + 5
        while worker.active and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.active == 0 and worker.steps - steps < 1_000_000


def test_cli_serve_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from scriven.cli import main
    assert main(["serve", str(tmp_path / "missing"), "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing" in err and "Traceback" not in err


def test_create_app_leaves_torch_threads_alone(models):
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)  # not the fixture's 1, so a reset to a default shows
    try:
        app = create_app({"lm": models[0]}, device="cpu")
        with TestClient(app, base_url="http://127.0.0.1") as c:
            assert c.post("/v1/generate", json={"prompt": "anna said", "max_new_tokens": 2,
                                                "seed": 0}).status_code == 200
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


def test_cli_serve_threads_set_torch_threads_before_the_app(monkeypatch, capsys):
    from scriven import cli
    from scriven.serve import app as app_module
    seen = {}

    def stop(*args):
        seen["threads"] = torch.get_num_threads()
        raise ScrivenError("stop here")

    monkeypatch.setattr(app_module, "create_app", stop)
    before = torch.get_num_threads()
    try:
        assert cli.main(["serve", "x", "--threads", str(before + 1)]) == 2
        assert seen["threads"] == before + 1
    finally:
        torch.set_num_threads(before)
    assert cli.main(["serve", "x", "--threads", "0"]) == 2
    assert "threads" in capsys.readouterr().err and torch.get_num_threads() == before


def test_limits_are_validated():
    with pytest.raises(ScrivenError, match="max_batch"):
        ServeLimits(max_batch=0)


def test_generators_and_translators_can_be_served_in_lower_precision(models, monkeypatch):
    from scriven import precision
    from scriven.generation import LoadedLM, generate
    from scriven.translator import translate
    monkeypatch.setattr(precision, "INT8_MATMUL_MIN", 0)  # these models are small
    app = create_app({"lm": models[0], "fr": models[1]}, precision="int8")
    sentences = ["the big dog sleeps.", "the old cat eats a book."]
    with TestClient(app, base_url="http://127.0.0.1") as c:
        assert [m["precision"] for m in c.get("/v1/models").json()["models"]] == ["int8"] * 2
        body = c.post("/v1/generate", json={"prompt": "anna said", "max_new_tokens": 8,
                                            "temperature": 0}).json()
        got = c.post("/v1/translate", json={"text": sentences, "beam": 2}).json()
    assert [t["text"] for t in got["translations"]] == translate(
        models[1], sentences, beam=2, device="cpu", precision="int8")
    expected = generate(LoadedLM.load(models[0], precision="int8"), "anna said",
                        max_new_tokens=8, temperature=0)[0]
    assert "anna said".title().split()[0] in expected
    assert expected.endswith(body["samples"][0]["generated"])
    with pytest.raises(ScrivenError, match="precision"):
        create_app({"lm": models[0]}, precision="fp16")
