"""The registry of model kinds: one place says what each checkpoint kind is."""

import pytest

from scriven.errors import ScrivenError
from scriven.lm import MODELS
from scriven.models import KINDS, build_model, kinds_for


def test_every_kind_has_one_task_and_the_trainers_agree():
    assert kinds_for("lm") == ("lstm", "gpt") and kinds_for("translate") == ("transformer",)
    for name, (config_cls, model_cls, _) in MODELS.items():  # `train lm --model NAME`
        assert (KINDS[name].config, KINDS[name].model, KINDS[name].task) == \
            (config_cls, model_cls, "lm")


def test_build_model_names_an_unknown_kind():
    with pytest.raises(ScrivenError, match="unknown model kind 'rnn'.*lstm, gpt, transformer"):
        build_model("rnn", {})
