import subprocess
import sys

import pytest
import torch

from scriven.errors import ScrivenError
from scriven.generation import LoadedLM, generate, generate_stream, next_piece, sample_ids
from scriven.lm import train_lm


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import make_text
    folder = tmp_path_factory.mktemp("gen")
    (folder / "tiny.txt").write_text(make_text())
    train_lm(str(folder / "tiny.txt"), folder / "run", preset="tiny", batch_size=4, seq_len=8,
             max_steps=40, lr=1e-2, eval_every=20, progress=False)
    return folder / "run"


def test_carried_state_equals_recomputing_the_whole_prefix(run):
    lm = LoadedLM.load(run)
    prompt = torch.tensor([lm.tokenizer.encode("anna said to the")], device=lm.device)
    ids = torch.cat([i[:, None] for i, _, _ in sample_ids(lm.model, prompt, 12, temperature=0)], 1)
    # Recompute: feed the whole sequence from scratch at every step and take the argmax.
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            logits, _ = lm.model(seq)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq[:, prompt.size(1):], ids)


def test_same_seed_same_text_and_samples_differ(run):
    a = generate(run, "anna said", max_new_tokens=20, seed=5, num_samples=3)
    b = generate(run, "anna said", max_new_tokens=20, seed=5, num_samples=3)
    assert a == b and len(a) == 3
    assert len(set(a)) > 1


def test_stream_yields_what_generate_returns(run):
    events = list(generate_stream(run, "the prince", max_new_tokens=15, seed=1, temperature=0.8))
    assert len(events) == 15
    assert all(0 < e.probability <= 1 for e in events)
    with_alts = list(generate_stream(run, "the prince", max_new_tokens=3, seed=1, alternatives=4))
    assert all(len(e.alternatives) == 4 for e in with_alts)
    assert all(e.alternatives[0][1] >= e.alternatives[-1][1] for e in with_alts)
    text = generate(run, "the prince", max_new_tokens=15, seed=1, temperature=0.8)[0]
    assert text == "The prince" + "".join(e.text for e in events)


def test_top_k_one_equals_greedy(run):
    assert generate(run, "kitty", max_new_tokens=10, top_k=1, seed=1) == \
        generate(run, "kitty", max_new_tokens=10, temperature=0)


def test_stop_string_ends_the_sample_before_it(run):
    text = generate(run, "anna", max_new_tokens=60, seed=2, stop=["."])[0]
    assert "." not in text


def test_max_new_tokens_zero_returns_the_prompt(run):
    assert generate(run, "anna said", max_new_tokens=0) == ["Anna said"]


def test_cli_with_max_new_tokens_zero_prints_the_prompt(run, capsys):
    from scriven.cli import main
    main(["generate", str(run), "anna said", "--max-new-tokens", "0"])
    assert capsys.readouterr().out == "Anna said\n"


@pytest.mark.parametrize("prompt", ["zorblax quuxified flimflam", "anna said flimflam"])
def test_text_after_an_unknown_last_word_is_spaced_and_cased_as_after_a_known_one(run, prompt):
    from scriven.tokenizers import detokenize
    lm = LoadedLM.load(run)
    with pytest.warns(UserWarning, match="flimflam"):
        events = list(generate_stream(lm, prompt, max_new_tokens=8, temperature=0))
        text = generate(lm, prompt, max_new_tokens=8, temperature=0)[0]
    words = prompt.split() + [lm.tokenizer.id_to_token(e.token_id) for e in events
                              if e.token_id >= 4]
    assert text == detokenize(words, sentence_case=True)
    assert text.startswith(detokenize(prompt.split(), sentence_case=True) + " ")


def test_unknown_words_and_emoji_warn_and_still_generate(run):
    with pytest.warns(UserWarning, match="zebra"):
        out = generate(run, "zebra 🙂 said", max_new_tokens=5, seed=0)
    assert out[0].startswith("Zebra 🙂 said")


@pytest.mark.parametrize("kwargs, word", [
    (dict(prompt=""), "prompt"),
    (dict(prompt="   "), "prompt"),
    (dict(temperature=-1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=10**6), "top_k"),
    (dict(top_p=0), "top_p"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(num_samples=0), "num_samples"),
])
def test_bad_generation_input_is_named(run, kwargs, word):
    args = dict(prompt="anna")
    args.update(kwargs)
    with pytest.raises(ScrivenError, match=word):
        generate(run, **args)


def test_cli_streams_and_reports_bad_checkpoints(run, tmp_path):
    ok = subprocess.run([sys.executable, "-m", "scriven", "generate", str(run), "anna said",
                         "--max-new-tokens", "5", "--seed", "1"], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("Anna said")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in (run / "best").iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    bad = subprocess.run([sys.executable, "-m", "scriven", "generate", str(broken), "anna"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "model.safetensors" in bad.stderr


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_lower_precision_generates_from_the_same_checkpoint(run, precision):
    lm = LoadedLM.load(run, precision=precision)
    assert lm.precision == precision
    texts = generate(lm, "anna said", max_new_tokens=15, seed=1, num_samples=2)
    assert all(t.startswith("Anna said") and len(t) > len("Anna said") for t in texts)
    cli = subprocess.run([sys.executable, "-m", "scriven", "generate", str(run), "anna said",
                          "--max-new-tokens", "5", "--precision", precision],
                         capture_output=True, text=True)
    assert cli.returncode == 0 and cli.stdout.startswith("Anna said")


def test_bad_precision_is_named(run):
    with pytest.raises(ScrivenError, match="precision"):
        generate(run, "anna", precision="fp8")
    with pytest.raises(ScrivenError, match="precision='int8'"):  # not silently ignored
        generate(LoadedLM.load(run), "anna", precision="int8")
    cli = subprocess.run([sys.executable, "-m", "scriven", "generate", str(run), "anna",
                          "--precision", "fp8"], capture_output=True, text=True)
    assert cli.returncode != 0 and "precision" in cli.stderr and "Traceback" not in cli.stderr


def test_a_pickle_in_place_of_weights_is_refused_not_loaded(run, tmp_path):
    import pickle
    evil = tmp_path / "evil"
    evil.mkdir()
    for f in (run / "best").iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (evil / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ScrivenError, match="not a valid safetensors"):
        generate(evil, "anna")
    assert not marker.exists()


def test_wrong_kind_or_corrupt_config_is_named(run, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in (run / "best").iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ScrivenError, match="config.json"):
        generate(bad, "anna")


def test_streamed_text_holds_a_quote_until_the_next_token_shows_its_side():
    from scriven.tokenizers import WordTokenizer, detokenize

    words = 'the prince . " " why , she said .'.split()
    tok = WordTokenizer.train(" ".join(words), lowercase=True)
    prompt, rest = tok.encode("the prince"), tok.encode(" ".join(words[2:]))
    text, held, generated, pieces = tok.decode(prompt), 0, [], []
    for n, token in enumerate(rest):
        generated.append(token)
        piece, held = next_piece(tok, prompt, generated, text, held, last=n == len(rest) - 1)
        text += piece
        pieces.append(piece)
    assert pieces[1] == pieces[2] == ""      # both quote marks wait for what follows them
    assert pieces[3] == '" "Why'               # then come out on the right sides, with "why"
    assert text == detokenize(words, sentence_case=True) == 'The prince." "Why, she said.'
