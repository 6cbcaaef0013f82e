import json
import time

import pytest
import torch

from scriven import sizing
from scriven.errors import ScrivenError
from scriven.lm import DEFAULT_OPTIMIZER, default_preset, train_lm
from scriven.models.gpt import GPT, GPTConfig
from scriven.models.lstm import LSTMConfig, LSTMLanguageModel
from scriven.sizing import Candidate, dropout_for, parameters_without_embeddings, pick


def candidates(*ratios: float) -> list[Candidate]:
    return [Candidate(f"c{i}", 1000, r * 1000, r * 1000) for i, r in enumerate(ratios)]


def test_pick_takes_the_largest_candidate_that_sees_enough_text_per_parameter():
    r = 5.0
    assert pick(candidates(4 * r, 2 * r, r, r / 2), r) == 2
    assert pick(candidates(4 * r), r) == 0


def test_pick_falls_back_to_the_smallest_when_none_fits():
    r = 5.0
    assert pick(candidates(r / 2, r / 4), r) == 0


@pytest.mark.parametrize("family", ["gpt", "lstm"])
def test_dropout_never_falls_as_the_budget_holds_more_epochs(family):
    values = [dropout_for(family, e) for e in (0.1, 1, 2, 3, 10, 100)]
    assert values == sorted(values) and values[0] == 0.0 and values[-1] > 0


def test_a_gpt_on_a_text_small_for_it_keeps_some_dropout():
    assert dropout_for("gpt", 6.0) == 0.0                                   # a large text
    assert dropout_for("gpt", 6.0, 1.1) == sizing.SMALL_TEXT["gpt"][1]     # words, 2 x 128
    assert dropout_for("gpt", 0.9, 1.1) == 0.0                             # seen once
    assert dropout_for("gpt", 100.0, 1.1) == dropout_for("gpt", 100.0)     # never lower
    assert dropout_for("lstm", 6.0, 1.1) == dropout_for("lstm", 6.0)


def test_parameters_without_embeddings_leave_out_the_tables_and_the_tied_head():
    model = GPT(GPTConfig(vocab_size=1000, d_model=32, n_heads=2, n_layers=1, d_ff=64, max_len=16))
    tables = model.embed.weight.numel() + model.pos.weight.numel()
    assert parameters_without_embeddings(model) == sum(p.numel() for p in model.parameters()) - tables


def test_timing_counts_the_fastest_step_not_one_slowed_by_the_machine():
    # Two steps in three are held up, as a busy machine holds up a run for seconds at a time:
    # their median would say 5,000 tokens/s.
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        time.sleep(0.01 if len(calls) % 3 == 0 else 0.2)
        return model(batch).sum(), 1000

    model = torch.nn.Linear(4, 4)
    speed = sizing.time_training(model, iter(lambda: torch.zeros(2, 4), None), loss_fn,
                                 torch.device("cpu"), "fp32", 1e-3, seconds=1.0)
    assert 1000 / 0.1 < speed <= 1000 / 0.01
    assert len(calls) <= sizing.WARMUP_STEPS + sizing.MAX_TIMED_STEPS


def test_choose_size_times_candidates_until_one_cannot_fit(monkeypatch):
    # Speeds that give the first three candidates 4, 2 and 1/2 times the tokens per parameter
    # the rule asks for: the second is chosen, and none past the third is timed.
    timed, dropouts = [], []

    def fake_timing(model, batches, loss_fn, device, amp, lr, seconds, optimizer):
        n = parameters_without_embeddings(model)
        if n not in timed:
            timed.append(n)
        dropouts.append((n, model.config.dropout))
        ratio = (4, 2, 0.5)[timed.index(n)] * sizing.RULES["gpt"][0]
        return ratio * n / 60 / sizing.RUN_EFFICIENCY

    monkeypatch.setattr(sizing, "time_training", fake_timing)
    base = GPTConfig(vocab_size=50, dropout=0.3)
    choice = sizing.choose_size("gpt", base, 1.0, 10**6, GPT, lambda b, t: iter(()), None,
                                torch.device("cpu"), "fp32")
    ratios = [c.text_per_parameter for c in choice.candidates]
    chosen = next(c for c in choice.candidates if c.name == choice.name)
    assert chosen.text_per_parameter >= choice.ratio == sizing.RULES["gpt"][0]
    assert ratios[-1] < choice.ratio                      # it stopped at the first that failed
    assert len(timed) == len(choice.candidates) < len(sizing.GPT_LADDER)
    assert choice.name == choice.candidates[-2].name      # the largest that fits
    rung = sizing.shaped("gpt", next(r for r in sizing.GPT_LADDER if r["name"] == choice.name),
                         1.0)
    assert choice.model_config.d_model == rung["model"]["d_model"]
    assert choice.model_config.max_len == choice.seq_len == rung["seq_len"]
    assert choice.model_config.vocab_size == 50
    assert choice.dropout == dropout_for("gpt", chosen.budget_tokens / 10**6,
                                         10**6 / chosen.parameters) > 0
    # Timed without dropout, then again with the dropout the epochs call for.
    assert [p for n, p in dropouts if n == chosen.parameters] == [0.0, choice.dropout]
    assert choice.name in choice.describe() and choice.record()["chose"] == choice.name
    assert "adamw" in choice.describe() and choice.record()["optimizer"] == "adamw"


def test_both_precisions_are_timed_only_where_auto_would_take_bf16_on_a_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(sizing, "autocast_dtype", lambda amp, device: torch.bfloat16)
    assert sizing.precisions_to_time("auto", cpu) == ("bf16", "off")
    assert sizing.precisions_to_time("off", cpu) == ("off",)         # the user's own choice
    assert sizing.precisions_to_time("auto", torch.device("cuda")) == ("auto",)
    monkeypatch.setattr(sizing, "autocast_dtype", lambda amp, device: None)
    assert sizing.precisions_to_time("auto", cpu) == ("auto",)       # no fast bf16: fp32


def test_a_size_that_fits_only_without_its_dropout_gives_way_to_the_next_smaller(monkeypatch):
    # Dropout halves every candidate's speed: the second, at 1.5 times the rule without it,
    # falls below the rule with it, and the first, at 4 times, is taken with its dropout.
    sizes = []

    def fake_timing(model, batches, loss_fn, device, amp, lr, seconds, optimizer):
        n = parameters_without_embeddings(model)
        if n not in sizes:
            sizes.append(n)
        ratio = (4, 1.5, 0.5)[sizes.index(n)] * sizing.RULES["gpt"][0]
        return ratio * n / 60 / sizing.RUN_EFFICIENCY / (2 if model.config.dropout else 1)

    monkeypatch.setattr(sizing, "time_training", fake_timing)
    choice = sizing.choose_size("gpt", GPTConfig(vocab_size=50), 1.0, 10**6, GPT,
                                lambda b, t: iter(()), None, torch.device("cpu"), "off")
    assert choice.name == sizing.GPT_LADDER[0]["name"] and choice.dropout > 0
    first, second = choice.candidates[:2]
    assert first.dropout == second.dropout == choice.dropout
    assert second.text_per_parameter < choice.ratio <= first.text_per_parameter
    assert f"dropout {choice.dropout:g}" in choice.describe()


def test_a_dropout_the_user_names_is_the_one_timed_and_trained(monkeypatch):
    seen = []

    def fake_timing(model, batches, loss_fn, device, amp, lr, seconds, optimizer):
        seen.append(model.config.dropout)
        return 1e9      # every candidate fits: the ladder is timed to its end

    monkeypatch.setattr(sizing, "time_training", fake_timing)
    choice = sizing.choose_size("gpt", GPTConfig(vocab_size=50), 1.0, 10**4, GPT,
                                lambda b, t: iter(()), None, torch.device("cpu"), "off",
                                dropout=0.3)
    assert set(seen) == {0.3} and len(seen) == len(sizing.GPT_LADDER)
    assert choice.dropout == choice.model_config.dropout == 0.3


def test_each_candidate_keeps_the_precision_it_was_timed_fastest_in(monkeypatch):
    # bf16 wins for the smallest candidate, fp32 for the rest; the first two fit the rule.
    monkeypatch.setattr(sizing, "precisions_to_time", lambda amp, device: ("bf16", "off"))
    sizes, calls = [], []

    def fake_timing(model, batches, loss_fn, device, amp, lr, seconds, optimizer):
        n = parameters_without_embeddings(model)
        if n not in sizes:
            sizes.append(n)
        calls.append((n, amp, seconds))
        faster = "bf16" if sizes.index(n) == 0 else "off"
        ratio = (4, 2, 0.5)[sizes.index(n)] * sizing.RULES["gpt"][0]
        return ratio * n / 60 / sizing.RUN_EFFICIENCY * (1.0 if amp == faster else 0.5)

    monkeypatch.setattr(sizing, "time_training", fake_timing)
    choice = sizing.choose_size("gpt", GPTConfig(vocab_size=50), 1.0, 10**10, GPT,
                                lambda b, t: iter(()), None, torch.device("cpu"), "auto")
    assert [c.amp for c in choice.candidates] == ["bf16", "off", "off"]
    assert choice.dropout == 0.0                # a large text: no dropout, no second timing
    assert len(calls) == 2 * len(choice.candidates)
    # Timing both takes no longer than timing one: each gets half the candidate's seconds.
    assert {s for _, _, s in calls} == {min(sizing.MAX_TIMING_SECONDS, sizing.BUDGET_SHARE * 60) / 2}
    assert choice.name == choice.candidates[1].name and choice.amp == "off"
    assert choice.record()["amp"] == "off" and "fp32" in choice.describe()


@pytest.mark.parametrize("family", ["lstm", "gpt"])
def test_a_language_model_counts_its_text_in_characters(monkeypatch, family):
    # Every candidate sees half the rule in tokens; at 4 characters a token, twice the rule in
    # characters: a larger size than the smallest is taken (on a word vocabulary, where a token
    # carries more than a character does).
    def fake_timing(model, batches, loss_fn, device, amp, lr, seconds, optimizer):
        n = parameters_without_embeddings(model)
        return 0.5 * sizing.RULES[family][0] * n / 60 / sizing.RUN_EFFICIENCY

    monkeypatch.setattr(sizing, "time_training", fake_timing)
    base = (GPTConfig if family == "gpt" else LSTMConfig)(vocab_size=50)
    make = GPT if family == "gpt" else LSTMLanguageModel
    choice = sizing.choose_size(family, base, 1.0, 10**6, make, lambda b, t: iter(()), None,
                                torch.device("cpu"), "fp32", chars_per_token=4.0)
    assert sizing.RULES[family][1] == "characters" and choice.unit == "characters"
    assert "characters" in choice.describe() and choice.record()["rule"]["unit"] == "characters"
    assert choice.name != choice.candidates[0].name


def test_a_gpt_window_holds_enough_characters_at_the_same_tokens_a_step():
    for rung in sizing.GPT_LADDER:
        for cpt in (1.0, 3.5, 4.6):  # characters, BPE pieces, words
            shape = sizing.shaped("gpt", rung, cpt)
            assert shape["seq_len"] * cpt >= sizing.MIN_CONTEXT_CHARACTERS
            assert shape["seq_len"] >= rung["seq_len"]
            assert (shape["seq_len"] == rung["seq_len"]
                    or shape["seq_len"] / 2 * cpt < sizing.MIN_CONTEXT_CHARACTERS)
            assert shape["batch_size"] * shape["seq_len"] == rung["batch_size"] * rung["seq_len"]
    small = sizing.GPT_LADDER[0]
    assert sizing.shaped("gpt", small, 1.0)["seq_len"] == 2 * small["seq_len"]  # characters
    assert sizing.shaped("gpt", small, 4.6) == small                            # words
    for rung in sizing.LSTM_LADDER:                                             # no window
        assert sizing.shaped("lstm", rung, 1.0) == rung


@pytest.mark.parametrize("model", ["gpt", "lstm"])
def test_auto_trains_the_chosen_size_records_why_and_resumes_it(tiny_text, tmp_path, model):
    run = tmp_path / "run"
    result = train_lm(str(tiny_text), run, preset="auto", model=model, tokenizer="char",
                      minutes=0.02, progress=False, evals_per_run=1)
    saved = json.loads((run / "latest" / "config.json").read_text())
    record = saved["sizing"]
    rung = sizing.shaped(model, next(r for r in sizing.LADDERS[model]
                                     if r["name"] == record["chose"]), 1.0)
    assert record["candidates"][0]["tokens_per_s"] > 0
    assert saved["train"]["batch_size"] == rung["batch_size"]
    assert saved["train"]["seq_len"] == rung["seq_len"]
    assert saved["train"]["lr"] == rung["lr"]
    # Timed with the optimizer it trains with: Muon for a GPT, AdamW for an LSTM.
    assert record["optimizer"] == saved["train"]["optimizer"] == DEFAULT_OPTIMIZER[model]
    width = "d_model" if model == "gpt" else "hidden_dim"
    assert saved["model"][width] == rung["model"][width]
    # The budget's clock includes the timing: a --minutes run ends when the user asked.
    assert result.elapsed >= record["timing_seconds"] - 0.01  # the record is rounded
    # A resume takes the run's size and shape from the checkpoint; it does not choose again.
    train_lm(str(tiny_text), run, preset="auto", model=model, tokenizer="char", minutes=0.04,
             progress=False, resume=True, evals_per_run=1)
    again = json.loads((run / "latest" / "config.json").read_text())
    assert again["model"] == saved["model"] and again["sizing"] == record
    assert again["train"]["batch_size"] == saved["train"]["batch_size"]


def test_auto_trains_in_the_precision_it_measured_fastest_and_a_resume_keeps_it(
        tiny_text, tmp_path, monkeypatch):
    monkeypatch.setattr(sizing, "precisions_to_time", lambda amp, device: ("bf16", "off"))
    real = sizing.time_training

    def fp32_faster(model, batches, loss_fn, device, amp, *rest):
        return real(model, batches, loss_fn, device, amp, *rest) * (2.0 if amp == "off" else 1.0)

    monkeypatch.setattr(sizing, "time_training", fp32_faster)
    run = tmp_path / "run"
    train_lm(str(tiny_text), run, preset="auto", model="gpt", tokenizer="char", minutes=0.02,
             progress=False, evals_per_run=1)
    saved = json.loads((run / "latest" / "config.json").read_text())
    assert saved["sizing"]["amp"] == saved["train"]["amp"] == "off"
    train_lm(str(tiny_text), run, preset="auto", model="gpt", tokenizer="char", minutes=0.04,
             progress=False, resume=True, evals_per_run=1)    # amp "auto" given: the run's kept
    assert json.loads((run / "latest" / "config.json").read_text())["train"]["amp"] == "off"


def test_auto_needs_a_time_budget(tiny_text, tmp_path):
    with pytest.raises(ScrivenError, match="preset"):
        train_lm(str(tiny_text), tmp_path / "run", preset="auto", max_steps=5, progress=False)


def test_an_unknown_preset_names_auto_among_the_choices(tiny_text, tmp_path):
    with pytest.raises(ScrivenError, match="auto"):
        train_lm(str(tiny_text), tmp_path / "run", preset="huge", minutes=0.1, progress=False)


def test_a_model_given_only_minutes_is_sized_for_them_and_the_rest_keep_the_default():
    assert default_preset(10.0, None, None) == "auto"
    assert default_preset(10.0, None, 500) == "default"   # a step budget too
    assert default_preset(None, 3, None) == "default"
    assert default_preset(None, None, 500) == "default"


def test_auto_is_refused_under_torchrun(tiny_text, tmp_path, monkeypatch):
    """Each process would time the candidates itself and might choose another size."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert default_preset(10.0, None, None) == "default"
    with pytest.raises(ScrivenError, match="preset auto times this machine"):
        train_lm(str(tiny_text), tmp_path / "run", model="gpt", preset="auto", minutes=1.0,
                 progress=False)
