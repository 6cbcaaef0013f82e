"""The command line and the Python API share one declaration of each parameter: an option's
default is the called function's default and its dest is that function's parameter."""

import argparse
import functools
import inspect

import pytest

from scriven import cli


def _options(command: cli.Command) -> list[tuple[cli.Option, argparse.Action]]:
    parser = argparse.ArgumentParser()
    cli.add_options(parser, command)
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    return [(option, actions[option.name]) for option in command.options]


@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: " ".join(c.words))
def test_each_option_is_a_parameter_with_its_default(command):
    for option, action in _options(command):
        if option.cli_only:
            continue
        target = command.target(option)
        params = inspect.signature(target).parameters
        assert option.name in params, f"{option.flag} is not a parameter of {target.__name__}"
        default = params[option.name].default
        if default is inspect.Parameter.empty:
            assert option.default is not cli._FROM_SIGNATURE or action.required \
                or not option.flag.startswith("-"), option.flag
        else:
            assert action.default == default, option.flag


@pytest.mark.parametrize("command", cli.COMMANDS, ids=lambda c: " ".join(c.words))
def test_a_command_calls_its_function_with_exactly_the_parsed_parameters(command):
    function = cli._load(command.function)
    params = inspect.signature(function).parameters
    grouped = set(command.grouped)
    dests = {o.name for o in command.options if not o.cli_only}
    for name in grouped:
        dests -= set(inspect.signature(cli._load(command.grouped[name])).parameters)
    assert dests | grouped <= set(params)
    # Every parameter without a default has its option, so no call can miss one.
    assert {n for n, p in params.items() if p.default is inspect.Parameter.empty} <= dests


def test_a_default_cannot_be_declared_twice():
    once = cli.Command(("x",), "", "data:fetch", (cli.Option("name", default="anna"),),
                       cli._print_returned)
    cli.add_options(argparse.ArgumentParser(), once)  # fetch's `name` has no default of its own
    twice = cli.Command(("x",), "", "evaluation:evaluate", (cli.Option("--beam", default=4),),
                        cli._print_returned)
    with pytest.raises(TypeError, match="--beam"):
        cli.add_options(argparse.ArgumentParser(), twice)


def test_parsed_values_reach_the_function(monkeypatch):
    from scriven import evaluation
    seen = {}
    # wraps: the command line reads the real function's signature through the stand-in
    monkeypatch.setattr(evaluation, "evaluate",
                        functools.wraps(evaluation.evaluate)(lambda **kw: seen.update(kw) or {}))
    assert cli.main(["evaluate", "ckpt", "anna", "--beam", "3", "--length-penalty", "0.6",
                     "--precision", "int8"]) == 0
    assert seen == {"checkpoint": "ckpt", "text": "anna", "device": "auto", "beam": 3,
                    "length_penalty": 0.6, "split": "test", "precision": "int8"}


def test_serve_limits_are_built_from_their_options(monkeypatch):
    from scriven.serve import app as app_module
    seen = {}
    monkeypatch.setattr(app_module, "serve",
                        functools.wraps(app_module.serve)(lambda **kw: seen.update(kw)))
    assert cli.main(["serve", "a", "b", "--timeout", "5", "--max-beam", "2"]) == 0
    limits = seen.pop("limits")
    assert (limits.request_timeout, limits.max_beam) == (5.0, 2)
    assert limits == app_module.ServeLimits(request_timeout=5.0, max_beam=2)
    assert seen["checkpoints"] == ["a", "b"] and seen["port"] == 8000


def test_flags_keep_their_spelling():
    parse = cli.build_parser().parse_args
    a = parse(["train", "lm", "anna", "--out", "x", "--no-progress", "--overwrite"])
    assert (a.progress, a.overwrite, a.resume) == (False, True, False)
    a = parse(["generate", "c", "p", "--stop", ".", "--stop", "!", "--top-p", "0.9"])
    assert (a.stop, a.top_p, a.top_k) == ([".", "!"], 0.9, None)
    a = parse(["plot", "curves", "run"])
    assert (a.metrics, a.out) == ("run", "loss.png")


def test_a_bad_number_is_one_line_and_exit_code_2(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["generate", "c", "p", "--top-k", "many"])
    assert stop.value.code == 2
    assert "--top-k: expected an integer, got 'many'" in capsys.readouterr().err
