"""The translator end to end on tiny generated pairs: training and checkpoints, exact resume,
translating strings, lists, files and stdin, beam search and n-best lists, bad input, BLEU/chrF
evaluation and the dataset attribution."""

from __future__ import annotations

import io
import json
import sys
import warnings

import pytest
import torch
from conftest import TINY_TRANSLATOR as TINY
from conftest import (
    as_before_per_task_configs,
    crash_after,
    make_pairs,
    one_thread,
    weights,
    write_pairs,
)
from safetensors.torch import load_file

import scriven.precision as precision_module
import scriven.translation as translate_module
from scriven import checkpoint as ckpt_io
from scriven.cli import main
from scriven.device import autocast_dtype, training_precision
from scriven.errors import ScrivenError
from scriven.models.transformer import Transformer
from scriven.precision import hold_linears
from scriven.search import greedy_search
from scriven.tokenizers import BOS_ID, EOS_ID, BPETokenizer
from scriven.train import CheckpointSpec, TrainConfig, fit
from scriven.translation import TranslateTrainConfig, evaluate_translation, train_translate
from scriven.translator import CrossAttention, LoadedTranslator, attention, translate


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def run(pair_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("translator") / "run"
    train_translate(pair_file, out, max_steps=80, eval_every=40, **TINY)
    return out


@pytest.fixture(scope="module")
def tr(run):
    return LoadedTranslator.load(run, "cpu")


def test_training_writes_a_checkpoint_and_lowers_validation_loss(run):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "state.safetensors",
                 "trainer.json"):
        assert (run / "latest" / name).is_file()
    assert (run / "best" / "model.safetensors").is_file()
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_bleu" in r]
    assert [r["step"] for r in evals] == [40, 80]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert all(0 <= r["val_bleu"] <= 100 and 0 <= r["val_chrf"] <= 100 for r in evals)
    saved = ckpt_io.load(run / "best")
    assert saved.kind == "transformer"
    data = saved.config["data"]
    assert data["split"]["by"] == "source sentence"
    assert data["pairs"]["train"] + data["pairs"]["valid"] + data["pairs"]["test"] == 300
    assert "attribution" not in data  # a user's own file carries no dataset attribution
    assert saved.config["model"]["share_embeddings"] is True


def test_tokenizer_keeps_case_and_accents(tr):
    text = "Mon frère voit l'école aujourd'hui."
    assert tr.tokenizer.decode(tr.tokenizer.encode(text)) == text


def test_translate_a_string_and_a_list(tr, run):
    one = translate(tr, "He sees the cat.")
    assert isinstance(one, str)
    sentences = ["He sees the cat.", "We see the moon today.", "My friends see my brother."]
    many = translate(run, sentences, device="cpu", max_len=20)
    assert isinstance(many, list) and len(many) == 3
    # Sorting into length batches is invisible: the same answers one by one, in input order.
    assert many == [translate(tr, s, max_len=20) for s in sentences]
    assert translate(tr, []) == []


def test_translations_are_greedy_search_detokenized(tr):
    ids = tr.tokenizer.encode("She sees the sea now.")
    expected = greedy_search(tr.model, torch.tensor([ids]), BOS_ID, EOS_ID, max_len=15)[0]
    assert translate(tr, "She sees the sea now.", max_len=15) == tr.tokenizer.decode(expected).strip()
    # Input is normalised like the training data: odd spaces and apostrophes do not matter.
    assert translate(tr, "  She\u00a0sees the sea  now. ", max_len=15) == translate(
        tr, "She sees the sea now.", max_len=15)


def test_beam_and_n_best(tr):
    text = "They see a bird at night."
    best = translate(tr, text, beam=4, n_best=3)
    assert len(best) == 3
    assert all(isinstance(t, str) and isinstance(s, float) for t, s in best)
    scores = [s for _, s in best]
    assert scores == sorted(scores, reverse=True)
    assert translate(tr, text, beam=4) == best[0][0]
    assert translate(tr, text, beam=1) == translate(tr, text)
    lists = translate(tr, [text, "I see the dog."], beam=2, n_best=2)
    assert len(lists) == 2 and all(len(h) == 2 for h in lists)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_lower_precision_translates_with_the_same_rules(tr, run, precision, monkeypatch):
    """Held in lower precision, the decoder's logits stay close to fp32's, beam 1 is still
    greedy, and batching still changes nothing; asking a loaded translator for another
    precision is an error, not ignored."""
    assert hold_linears(Transformer(tr.model.config), precision) == 0  # small layers stay fp32
    monkeypatch.setattr(precision_module, "LOW_PRECISION_MIN", 0)
    monkeypatch.setattr(precision_module, "INT8_MATMUL_MIN", 0)
    held = LoadedTranslator.load(run, "cpu", precision)
    assert held.precision == precision
    assert sum(p.numel() for p in held.model.parameters()) == sum(
        p.numel() for p in tr.model.parameters())
    src = torch.tensor([tr.tokenizer.encode("We see the moon today.")])
    tgt = torch.tensor([[BOS_ID, *tr.tokenizer.encode("Nous voyons")]])
    with torch.inference_mode():
        exact, low = tr.model(src, tgt), held.model(src, tgt)
    assert not torch.equal(low, exact)
    assert (low - exact).abs().max() <= 0.05 * exact.abs().max()
    sentences = ["He sees the cat.", "We see the moon today.", "My friends see my brother."]
    assert translate(held, sentences, beam=1) == translate(held, sentences)
    assert translate(held, sentences, beam=3) == [translate(held, s, beam=3) for s in sentences]
    assert translate(run, sentences[0], device="cpu", precision=precision) == translate(
        held, sentences[0])
    with pytest.raises(ScrivenError, match="precision"):
        translate(held, "I see.", precision="fp32")
    with pytest.raises(ScrivenError, match="precision"):
        translate(run, "I see.", device="cpu", precision="fp8")


@pytest.mark.parametrize("kwargs, message", [
    (dict(beam=0), "beam"),
    (dict(beam=2, n_best=3), "n_best"),
    (dict(n_best=0), "n_best"),
    (dict(max_len=0), "max_len"),
    (dict(max_len=10_000), "max_len"),
    (dict(length_penalty=-1.0), "length_penalty"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_search_parameters_are_named(tr, kwargs, message):
    with pytest.raises(ScrivenError, match=message):
        translate(tr, "I see the cat.", **kwargs)


def test_empty_source_is_named(tr):
    with pytest.raises(ScrivenError, match="text is empty"):
        translate(tr, "   ")
    with pytest.raises(ScrivenError, match=r"text\[1\] is empty"):
        translate(tr, ["I see the cat.", "", "He sees the dog."])
    with pytest.raises(ScrivenError, match=r"text\[0\] must be a string"):
        translate(tr, [None])


def test_unknown_characters_and_emoji_do_not_crash(tr):
    out = translate(tr, ["I see 🐈‍⬛ the cat 🙂.", "Ωμέγα 漢字 ǅ \u0301", "<unk> sees <eos>."])
    assert len(out) == 3
    for text in out:
        assert isinstance(text, str)
        assert "\ufffd" not in text and "<unk>" not in text and "<eos>" not in text


def test_a_source_longer_than_max_len_is_cut_with_a_warning(tr):
    long = " ".join(["the cat"] * 200) + "."
    with pytest.warns(UserWarning, match="max_len"):
        out = translate(tr, ["I see the cat.", long])
    assert len(out) == 2 and isinstance(out[1], str)


def test_a_language_model_checkpoint_is_refused(tiny_text, tmp_path):
    from scriven.lm import train_lm
    train_lm(str(tiny_text), tmp_path / "lm", preset="tiny", batch_size=4, seq_len=8,
             max_steps=2, eval_every=2, progress=False)
    with pytest.raises(ScrivenError, match="lstm.*transformer"):
        translate(tmp_path / "lm", "I see the cat.")
    with pytest.raises(ScrivenError, match="no such file"):
        translate(tmp_path / "missing", "I see the cat.")


def test_attention_maps(tr):
    found = attention(tr, "He sees the cat.")
    assert isinstance(found, CrossAttention)
    cfg = tr.model.config
    assert found.cross.shape == (cfg.decoder_layers, cfg.n_heads, len(found.target_tokens),
                                 len(found.source_tokens))
    assert found.target_tokens[-1] == "<eos>"
    assert found.translation == translate(tr, "He sees the cat.")
    assert torch.allclose(found.cross.sum(-1), torch.ones(found.cross.shape[:-1]), atol=1e-5)
    forced = attention(tr, "He sees the cat.", target="Il voit le chat.")
    assert forced.translation == "Il voit le chat."
    assert json.loads(json.dumps(forced.to_dict()))["target_tokens"] == forced.target_tokens


@pytest.mark.parametrize("amp, optimizer", [("off", "adamw"), ("bf16-pure", "adamw"),
                                           ("bf16-pure", "muon")])
def test_resume_equals_uninterrupted_training(pair_file, tmp_path, monkeypatch, amp, optimizer):
    args = dict(TINY, max_steps=17, eval_every=5, bleu_sentences=3, dropout=0.3, amp=amp,
                optimizer=optimizer)
    train_translate(pair_file, tmp_path / "full", **args)

    restore = crash_after(monkeypatch, translate_module.TranslationTask, steps=10)  # the step-10 checkpoint is on disk
    with pytest.raises(KeyboardInterrupt):
        train_translate(pair_file, tmp_path / "cut", **args)
    restore()
    trainer = json.loads((tmp_path / "cut" / "latest" / "trainer.json").read_text())
    assert trainer["progress"]["step"] == 10
    train_translate(pair_file, tmp_path / "cut", resume=True, **args)

    full, resumed = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_a_translator_checkpoint_from_before_per_task_configs_resumes(pair_file, tmp_path):
    """Checkpoints written before each task had its own config also hold the language model's
    batch_size and seq_len: a resume ignores them and still compares the translator's own."""
    run = tmp_path / "run"
    train_translate(pair_file, run, max_steps=2, eval_every=2, **TINY)
    as_before_per_task_configs(run)
    with pytest.raises(ScrivenError, match="--resume: .*max_tokens 512 -> 256"):
        train_translate(pair_file, run, max_steps=3, eval_every=2, resume=True,
                        **{**TINY, "max_tokens": 256})
    result = train_translate(pair_file, run, max_steps=3, eval_every=2, resume=True, **TINY)
    assert result.steps == 3


def _saved_config(run):
    return json.loads((run / "latest" / "config.json").read_text())


def test_dropout_follows_the_passes_the_budget_holds(pair_file, tmp_path):
    """Without --dropout, a budget of few passes over the pairs trains without dropout (it only
    slows learning there); a longer one keeps the preset's; an explicit dropout always wins."""
    args = {**TINY, "eval_every": 50}
    train_translate(pair_file, tmp_path / "few", epochs=1, **args)
    few = _saved_config(tmp_path / "few")
    assert few["model"]["dropout"] == 0.0
    assert few["sizing"] == {"dropout": 0.0, "budget_epochs": 1.0, "timed_tokens_per_s": None,
                             "timing_seconds": 0.0}
    train_translate(pair_file, tmp_path / "many", epochs=6, **args)
    many = _saved_config(tmp_path / "many")
    assert many["model"]["dropout"] == translate_module.TRANSLATOR_PRESETS["tiny"]["dropout"] > 0
    assert many["sizing"]["budget_epochs"] == 6.0
    train_translate(pair_file, tmp_path / "stated", epochs=1, dropout=0.2, **args)
    stated = _saved_config(tmp_path / "stated")
    assert stated["model"]["dropout"] == 0.2 and "sizing" not in stated


def test_a_budget_of_minutes_times_the_model_for_its_dropout(pair_file, tmp_path, monkeypatch):
    """For --minutes the passes come from the speed of a few timed steps on this machine,
    taken from the budget; the checkpoint records it and a resume keeps it."""
    import scriven.sizing as sizing

    timed = []

    def fake_speed(model, batches, loss_fn, device, amp, lr, seconds, optimizer):
        loss, n = loss_fn(model, next(iter(batches)))  # real batches and loss
        timed.append((n, seconds))
        return 1.0  # target tokens/s: far below one pass in the budget
    monkeypatch.setattr(translate_module, "time_training", fake_speed)
    run = tmp_path / "run"
    train_translate(pair_file, run, minutes=0.02, **TINY)
    saved = _saved_config(run)
    assert timed and timed[0][0] > 0 and timed[0][1] <= sizing.BUDGET_SHARE * 0.02 * 60
    assert saved["model"]["dropout"] == 0.0
    assert saved["sizing"]["timed_tokens_per_s"] == 1 and saved["sizing"]["budget_epochs"] < 0.01
    train_translate(pair_file, run, minutes=0.04, resume=True, **TINY)
    assert len(timed) == 1 and _saved_config(run)["sizing"] == saved["sizing"]


def test_a_resume_keeps_the_runs_own_recipe(pair_file, tmp_path):
    """max_tokens and lr left out of a resume are the run's own, not today's preset recipe."""
    run = tmp_path / "run"
    recipe = {k: v for k, v in TINY.items() if k not in ("max_tokens", "lr")}
    train_translate(pair_file, run, max_steps=2, eval_every=2, max_tokens=256, lr=1e-3, **recipe)
    result = train_translate(pair_file, run, max_steps=3, eval_every=2, resume=True, **recipe)
    assert result.steps == 3
    saved = _saved_config(run)["train"]
    assert (saved["max_tokens"], saved["lr"]) == (256, 1e-3)
    fresh = train_translate(pair_file, tmp_path / "fresh", max_steps=1, eval_every=1, **recipe)
    assert _saved_config(fresh.out)["train"]["max_tokens"] == translate_module.RECIPES["tiny"][
        "max_tokens"]


def test_bf16_pure_steps_update_fp32_master_weights(pair_file, tmp_path):
    """bf16-pure runs the steps on a bf16 copy but keeps fp32 weights: updates far below bf16's
    resolution (about 0.4 % of a weight) still accumulate, and checkpoints hold fp32."""
    data = translate_module.load_pairs(pair_file)
    tok = BPETokenizer.train([p.source for p in data.train] + [p.target for p in data.train], 300)
    examples, _ = translate_module.encode_pairs(tok, data.train, 64)
    torch.manual_seed(0)
    net = Transformer(translate_module.model_config("tiny", tok.vocab_size))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    task = translate_module.TranslationTask(examples, examples[:4], [examples[0][0]], ["x"], tok,
                                            512, 0, torch.device("cpu"))
    config = TranslateTrainConfig(max_steps=3, max_tokens=512, lr=1e-6, warmup_steps=0,
                                  weight_decay=0.0, amp="bf16-pure", eval_every=100)
    fit(net, task, config, tmp_path / "run", CheckpointSpec("transformer", {}, tok.to_json_str(), {}),
        progress_bar=False)
    after = net.state_dict()
    matrices = [k for k, v in after.items() if v.dim() == 2]
    assert all(after[k].dtype == torch.float32 for k in after)
    changed = [k for k in matrices if not torch.equal(after[k], before[k])]
    assert changed == matrices  # every matrix moved ...
    for k in matrices:           # ... by less than bf16 could have shown
        same_in_bf16 = (after[k].bfloat16() == before[k].bfloat16()).float().mean()
        assert same_in_bf16 > 0.9
    saved = load_file(str(tmp_path / "run" / "latest" / "model.safetensors"))
    assert all(v.dtype == torch.float32 for v in saved.values())


def test_auto_precision_and_bad_amp():
    cpu = torch.device("cpu")
    bf16 = autocast_dtype("auto", cpu) is torch.bfloat16
    assert training_precision("auto", cpu, pure_bf16=True) == ("bf16-pure" if bf16 else "auto")
    assert training_precision("auto", cpu, pure_bf16=False) == "auto"  # language models
    assert training_precision("off", cpu, pure_bf16=True) == "off"
    with pytest.raises(ScrivenError, match="amp"):
        TrainConfig(max_steps=1, amp="bf17")


def test_malformed_lines_warn_with_line_numbers_and_strict_refuses(tmp_path):
    lines = [f"{a}\t{b}" for a, b in make_pairs(120)]
    lines[4] = "no tab on this line"
    lines[9] = "\tempty source"
    path = tmp_path / "bad.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"2 malformed: line 5 .*line 10"):
        train_translate(str(path), tmp_path / "run", max_steps=2, eval_every=2, **TINY)
    with pytest.raises(ScrivenError, match=r"bad.tsv:5"):
        train_translate(str(path), tmp_path / "strict", max_steps=2, strict=True, **TINY)
    with pytest.warns(UserWarning, match="over the length limit"):
        train_translate(str(path), tmp_path / "short", max_steps=2, eval_every=2, max_words=5,
                        **TINY)


def test_bad_training_parameters_are_named(pair_file, tmp_path):
    with pytest.raises(ScrivenError, match="preset"):
        train_translate(pair_file, tmp_path / "r", max_steps=2, **dict(TINY, preset="huge"))
    with pytest.raises(ScrivenError, match="missing.tsv"):
        train_translate(str(tmp_path / "missing.tsv"), tmp_path / "r", max_steps=2, **TINY)
    with pytest.raises(ScrivenError, match="no such file"):
        train_translate(pair_file, tmp_path / "none", max_steps=2, resume=True, **TINY)


def test_evaluate_on_a_pair_file_scores_all_pairs(tr, tmp_path):
    pairs = make_pairs(40, seed=7)
    path = write_pairs(tmp_path / "other.tsv", pairs)
    result = evaluate_translation(tr, path, limit=None)
    assert result["sentences"] == 40 and "all 40 pairs" in result["pairs"]
    assert 0 <= result["bleu"] <= 100 and 0 <= result["chrf"] <= 100
    assert "tok:13a" in result["bleu_signature"] and "case:mixed" in result["bleu_signature"]
    assert result["chrf_signature"].startswith("nrefs:1")
    assert evaluate_translation(tr, path, limit=10)["sentences"] == 10
    assert result["precision"] == "fp32"


def test_evaluate_scores_the_precision_asked_for(run, tmp_path, monkeypatch):
    from scriven.evaluation import evaluate
    monkeypatch.setattr(precision_module, "INT8_MATMUL_MIN", 0)  # a tiny model's layers are small
    import sacrebleu
    pairs = make_pairs(20, seed=3)
    result = evaluate(run, str(write_pairs(tmp_path / "other.tsv", pairs)), device="cpu",
                      precision="int8")
    hypotheses = translate(run, [s for s, _ in pairs], device="cpu", precision="int8")
    assert result["precision"] == "int8" and result["sentences"] == 20
    assert result["bleu"] == round(sacrebleu.corpus_bleu(hypotheses, [[t for _, t in pairs]]).score, 2)


def test_evaluate_on_the_training_file_uses_its_test_split(tr, run, pair_file):
    result = evaluate_translation(tr, pair_file)
    test_pairs = ckpt_io.load(run / "best").config["data"]["pairs"]["test"]
    assert "held-out test split" in result["pairs"] and result["sentences"] == test_pairs


def test_evaluate_chooses_decoding_on_the_valid_split(tr, run, pair_file, tmp_path):
    counts = ckpt_io.load(run / "best").config["data"]["pairs"]
    valid = evaluate_translation(tr, pair_file, beam=2, length_penalty=1.5, split="valid")
    assert "held-out valid split" in valid["pairs"] and valid["sentences"] == counts["valid"]
    assert (valid["beam"], valid["length_penalty"]) == (2, 1.5)
    with pytest.raises(ScrivenError, match="split"):
        evaluate_translation(tr, pair_file, split="train")
    other = write_pairs(tmp_path / "other.tsv", make_pairs(20, seed=5))
    with pytest.raises(ScrivenError, match="split"):  # a foreign file is scored whole
        evaluate_translation(tr, other, split="valid")


def _cli(capsys, monkeypatch, *args, stdin: str | None = None):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin.encode("utf-8"))))
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_translates_text_file_and_stdin(tr, run, tmp_path, capsys, monkeypatch):
    sentences = ["He sees the cat.", "We see the moon today.", "I see a tree."]
    expected = translate(tr, sentences)
    code, out, _ = _cli(capsys, monkeypatch, "translate", run, sentences[0], "--device", "cpu")
    assert code == 0 and out == expected[0] + "\n"
    path = tmp_path / "in.txt"
    path.write_text("\n".join(sentences) + "\n", encoding="utf-8")
    code, out, _ = _cli(capsys, monkeypatch, "translate", run, "--file", path)
    assert code == 0 and out.splitlines() == expected
    code, out, _ = _cli(capsys, monkeypatch, "translate", run, "-", stdin="\n".join(sentences))
    assert code == 0 and out.splitlines() == expected
    code, out, _ = _cli(capsys, monkeypatch, "translate", run, "--beam", "3", "--n-best", "2",
                        stdin="\n".join(sentences[:2]) + "\n")
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and [r[0] for r in rows] == ["1", "1", "2", "2"]
    assert rows[0][2] == translate(tr, sentences[0], beam=3)
    code, out, _ = _cli(capsys, monkeypatch, "translate", run, sentences[1], "--precision", "int8")
    assert code == 0 and out == translate(run, sentences[1], device="cpu", precision="int8") + "\n"


def test_cli_errors_are_one_line(run, tmp_path, capsys, monkeypatch):
    path = tmp_path / "in.txt"
    path.write_text("I see the cat.\n\nHe sees the dog.\n", encoding="utf-8")
    code, out, err = _cli(capsys, monkeypatch, "translate", run, "--file", path)
    assert code == 2 and "line 2" in err and "empty" in err and len(err.splitlines()) == 1
    code, _, err = _cli(capsys, monkeypatch, "translate", run, "I see.", "--beam", "0")
    assert code == 2 and "beam" in err and "Traceback" not in err
    code, _, err = _cli(capsys, monkeypatch, "translate", run, "I see.", "--file", path)
    assert code == 2 and "not both" in err


def test_cli_train_and_evaluate(pair_file, tmp_path, capsys, monkeypatch):
    code, out, _ = _cli(capsys, monkeypatch, "train", "translate", pair_file, "--out",
                        tmp_path / "run", "--preset", "tiny", "--vocab-size", "300",
                        "--max-tokens", "512", "--max-steps", "3", "--bleu-sentences", "3",
                        "--no-progress")
    assert code == 0 and json.loads(out)["steps"] == 3
    code, out, _ = _cli(capsys, monkeypatch, "evaluate", tmp_path / "run", pair_file)
    result = json.loads(out)
    assert code == 0 and {"bleu", "chrf", "bleu_signature", "chrf_signature"} <= set(result)
    assert "version:" in result["bleu_signature"]
    code, out, _ = _cli(capsys, monkeypatch, "evaluate", tmp_path / "run", pair_file,
                        "--beam", "2", "--length-penalty", "0.6", "--split", "valid")
    result = json.loads(out)
    assert code == 0 and "valid split" in result["pairs"] and result["beam"] == 2


def test_eng_fra_by_name_carries_the_attribution(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    write_pairs(mirror / "eng-fra.tsv", make_pairs(150, seed=3))
    monkeypatch.setenv("SCRIVEN_DATA_MIRROR", str(mirror))
    train_translate("eng-fra", tmp_path / "run", max_steps=2, eval_every=2, **TINY)
    data = ckpt_io.load(tmp_path / "run" / "best").config["data"]
    assert data["dataset"] == "eng-fra"
    assert data["attribution"] == "www.manythings.org/anki and tatoeba.org"
    assert data["licence"] == "CC-BY 2.0 FR"
    result = evaluate_translation(tmp_path / "run", "eng-fra", device="cpu")
    assert "held-out test split of eng-fra" in result["pairs"]
    assert result["sentences"] == data["pairs"]["test"]
