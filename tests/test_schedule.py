"""Schedules follow the budget (issue 20, item 2): warmup, decay and validations are fractions of
the planned steps, a --minutes run plans its steps from its own speed, and resume keeps the plan."""

import json
import math
from types import SimpleNamespace

import pytest
from conftest import TINY_LM, crash_after, one_thread

from scriven import train as train_module
from scriven.config import from_dict, to_dict
from scriven.errors import ScrivenError
from scriven.lm import LMTask, LMTrainConfig, train_lm
from scriven.train import (
    PLAN_AFTER_STEPS,
    Plan,
    Progress,
    TrainConfig,
    lr_at,
    make_plan,
    plan_from_speed,
)
from scriven.translation import TranslateTrainConfig


def curve(config, plan):
    return [lr_at(config, s, s / plan.steps, plan) for s in range(plan.steps)]


@pytest.mark.parametrize("steps", [40, 1_103, 12_000])
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.2])
def test_warmup_ends_at_the_planned_fraction_and_cosine_reaches_the_floor(steps, fraction):
    config = TrainConfig(max_steps=steps, lr=1e-3, warmup_fraction=fraction, min_lr_ratio=0.05)
    plan = make_plan(config, steps)
    lrs = curve(config, plan)
    assert plan.warmup == round(fraction * steps)
    peak = max(range(steps), key=lambda s: lrs[s])
    assert peak == max(plan.warmup - 1, 0) and lrs[peak] == pytest.approx(1e-3, rel=0.01)
    assert all(a < b for a, b in zip(lrs[:plan.warmup], lrs[1:plan.warmup]))    # rising
    assert all(a >= b for a, b in zip(lrs[plan.warmup:], lrs[plan.warmup + 1:]))  # then falling
    assert lrs[-1] == pytest.approx(5e-5, rel=0.01, abs=1e-7)                     # floor at the end
    assert lr_at(config, steps, 1.0, plan) == pytest.approx(5e-5)


def test_the_same_budget_fraction_gets_the_same_rate_on_slow_and_fast_machines():
    """A 60-minute run is scheduled alike at 1,000 and at 12,000 steps an hour."""
    config = TrainConfig(minutes=60, lr=1e-3)
    slow, fast = make_plan(config, 1_000), make_plan(config, 12_000)
    for fraction in (0.02, 0.05, 0.25, 0.5, 0.9):
        a = lr_at(config, int(fraction * slow.steps), fraction, slow)
        b = lr_at(config, int(fraction * fast.steps), fraction, fast)
        assert a == pytest.approx(b, rel=0.05)  # one step of 1,000 apart at most


@pytest.mark.parametrize("ratio", [0.0, 0.05])
def test_linear_decay_falls_evenly_from_the_warmup_to_the_floor(ratio):
    config = TrainConfig(max_steps=1000, lr=1e-3, schedule="linear", min_lr_ratio=ratio,
                         warmup_fraction=0.1)
    plan = make_plan(config, 1000)
    lrs = curve(config, plan)
    assert lrs[99] == pytest.approx(1e-3)
    drops = [a - b for a, b in zip(lrs[100:], lrs[101:])]
    assert min(drops) == pytest.approx(max(drops)) and min(drops) > 0  # a straight line down
    assert lrs[550] == pytest.approx(1e-3 * (ratio + (1 - ratio) * 0.5), rel=0.01)
    assert lr_at(config, 1000, 1.0, plan) == pytest.approx(1e-3 * ratio, abs=1e-12)
    assert "linear decay" in plan.describe(config)


def test_inverse_sqrt_follows_the_planned_warmup():
    config = TrainConfig(max_steps=1000, schedule="inverse_sqrt", warmup_fraction=0.1)
    plan = make_plan(config, 1000)
    assert lr_at(config, 99, 0.1, plan) == pytest.approx(config.lr)
    assert lr_at(config, 400, 0.4, plan) == pytest.approx(config.lr * math.sqrt(100 / 400))


def test_explicit_warmup_steps_and_eval_every_override_the_fractions():
    config = TrainConfig(max_steps=1000, warmup_steps=7, eval_every=33)
    plan = make_plan(config, 1000)
    assert (plan.warmup, plan.eval_every) == (7, 33)
    assert make_plan(TrainConfig(max_steps=1000, evals_per_run=4), 1000).eval_every == 250


def test_a_minutes_plan_is_the_remaining_time_at_the_measured_speed():
    config = TrainConfig(minutes=60, max_steps=5000)
    plan = plan_from_speed(config, 20, 72.0, 1000 / 3600, step_budget=None)
    assert plan.steps == 20 + round((3600 - 72) / 3.6)
    assert plan.warmup == round(0.05 * plan.steps)
    assert plan_from_speed(config, 20, 1.0, 12_000 / 3600, step_budget=5000).steps == 5000


def test_before_the_plan_warmup_follows_the_clock():
    config = TrainConfig(minutes=10, lr=1e-3, warmup_fraction=0.05)
    assert lr_at(config, 3, 0.025) == pytest.approx(5e-4)
    assert lr_at(config, 3, 0.05) == pytest.approx(1e-3)
    assert lr_at(config, 3, 1.0) == pytest.approx(5e-5)


def test_a_slow_down_still_anneals_before_time_is_up():
    """The plan counted on more steps than the minutes held: time decides the decay."""
    config = TrainConfig(minutes=10, lr=1e-3)
    plan = make_plan(config, 1000)
    assert lr_at(config, 500, 1.0, plan) == pytest.approx(5e-5)


def test_bad_schedule_settings_are_named():
    with pytest.raises(ScrivenError, match="warmup_fraction"):
        TrainConfig(max_steps=1, warmup_fraction=0.9)
    with pytest.raises(ScrivenError, match="evals_per_run"):
        TrainConfig(max_steps=1, evals_per_run=0)
    with pytest.raises(ScrivenError, match="eval_every"):
        TrainConfig(max_steps=1, eval_every=0)


def test_each_task_config_refuses_the_other_tasks_settings():
    with pytest.raises(ScrivenError, match="unknown key.*seq_len"):
        from_dict(TranslateTrainConfig, {"max_steps": 1, "seq_len": 8})
    with pytest.raises(ScrivenError, match="unknown key.*max_tokens"):
        from_dict(LMTrainConfig, {"max_steps": 1, "max_tokens": 512})
    with pytest.raises(ScrivenError, match="batch_size"):
        LMTrainConfig(max_steps=1, batch_size=0)
    with pytest.raises(ScrivenError, match="max_tokens"):
        TranslateTrainConfig(max_steps=1, max_tokens=0)
    assert "seq_len" not in to_dict(TranslateTrainConfig(max_steps=1))
    assert "max_tokens" not in to_dict(LMTrainConfig(max_steps=1))


def _records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_minutes_run_plans_from_its_speed_and_resume_keeps_the_plan(tiny_text, tmp_path,
                                                                     monkeypatch):
    # Many validations per run: one at every step once the plan exists, so `latest` (with the
    # plan in its trainer state) is written right after planning.
    args = dict(TINY_LM, eval_every=None, evals_per_run=10**9, minutes=0.5)
    run = tmp_path / "run"
    restore = crash_after(monkeypatch, LMTask, PLAN_AFTER_STEPS + 3)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        train_lm(str(tiny_text), run, model="gpt", **args)
    plans = [r for r in _records(run) if "plan" in r]
    assert len(plans) == 1 and plans[0]["step"] == PLAN_AFTER_STEPS + 1  # timing skips step 1
    plan = plans[0]["plan"]
    assert plan["steps"] > PLAN_AFTER_STEPS and plan["eval_every"] == 1
    assert plan["warmup"] == round(0.05 * plan["steps"])
    validated = [r["step"] for r in _records(run) if "val_loss" in r]
    assert validated and min(validated) == PLAN_AFTER_STEPS + 1  # none before the plan

    restore()
    crash_after(monkeypatch, LMTask, 2)
    with one_thread(), pytest.raises(KeyboardInterrupt):
        train_lm(str(tiny_text), run, model="gpt", resume=True, **args)
    assert len([r for r in _records(run) if "plan" in r]) == 1  # not planned again
    trainer = json.loads((run / "latest" / "trainer.json").read_text())["progress"]
    assert trainer["step"] == PLAN_AFTER_STEPS + 3 + 2
    assert (trainer["planned_steps"], trainer["planned_minutes"]) == (plan["steps"], 0.5)


def test_a_run_faster_than_its_first_steps_plans_again_and_resume_keeps_it(tiny_text, tmp_path,
                                                                          monkeypatch):
    # The trainer's clock is a fake one that each step advances: 30 ms for the steps the plan is
    # timed on, 3 ms after. The first plan counts on a fifth of the steps the minutes hold;
    # validations re-plan from the speed since, keeping the warmup and the validation interval,
    # so the decay ends with the budget.
    clock, real, calls = {"now": 0.0}, LMTask.loss, {"n": 0}

    def timed(self, model, batch, smoothing):
        calls["n"] += 1
        clock["now"] += 0.03 if calls["n"] <= PLAN_AFTER_STEPS + 1 else 0.003
        return real(self, model, batch, smoothing)

    monkeypatch.setattr(LMTask, "loss", timed)
    monkeypatch.setattr(train_module, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    run = tmp_path / "run"
    with one_thread():
        result = train_lm(str(tiny_text), run, model="gpt", **{**TINY_LM, "eval_every": None},
                          minutes=0.02)
    plans = [r["plan"] for r in _records(run) if "plan" in r]
    first, last = plans[0], plans[-1]
    timed = 0.03 * (PLAN_AFTER_STEPS + 1)
    assert first["steps"] == PLAN_AFTER_STEPS + 1 + round((1.2 - timed) / 0.03)
    assert len(plans) >= 2 and last["steps"] > 3 * first["steps"]
    assert all((p["warmup"], p["eval_every"]) == (first["warmup"], first["eval_every"])
               for p in plans)
    assert abs(last["steps"] - result.steps) <= 0.05 * result.steps
    trainer = json.loads((run / "latest" / "trainer.json").read_text())["progress"]
    assert (trainer["planned_steps"], trainer["planned_warmup"], trainer["planned_eval_every"]) \
        == (last["steps"], first["warmup"], first["eval_every"])


def test_a_resume_keeps_a_re_planned_warmup_and_validation_interval():
    config = TrainConfig(minutes=1)
    kept = Progress(step=300, planned_steps=500, planned_minutes=1, planned_warmup=7,
                    planned_eval_every=33)
    assert train_module._initial_plan(config, kept, None) == Plan(500, 7, 33)
    older = Progress(step=300, planned_steps=500, planned_minutes=1)  # before re-planning
    assert train_module._initial_plan(config, older, None) == make_plan(config, 500)


def test_cli_defaults_are_fractions_of_the_plan():
    from scriven.cli import build_parser
    parse = build_parser().parse_args
    lm = parse(["train", "lm", "anna", "--out", "x"])
    tr = parse(["train", "translate", "eng-fra", "--out", "x"])
    for a, evals in ((lm, 10), (tr, 5)):
        assert (a.warmup_steps, a.eval_every, a.warmup_fraction, a.evals_per_run) == \
            (None, None, 0.05, evals)
    assert parse(["train", "lm", "anna", "--out", "x", "--warmup-steps", "0"]).warmup_steps == 0
