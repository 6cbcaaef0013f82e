"""The command line: each subcommand parses its arguments and calls one public function with the
same parameter names (`scriven generate --top-p 0.9` -> `scriven.generate(..., top_p=0.9)`).

Each command is declared once below: the function it calls, and per option only what the
function's signature cannot say (flag, help, and type or choices where the annotation is not
enough). The option's dest is the parameter's name and its default is the parameter's default,
so the command line and the Python API cannot drift apart (tests/test_cli.py checks it)."""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import import_module
from typing import Any

from .device import AMP_MODES
from .errors import ScrivenError
from .optimizers import OPTIMIZERS
from .train import SCHEDULES


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


# Parsers for annotations; a range (positive, at most 1) is the function's to check, once.
_TYPES: dict[str, Callable[[str], Any]] = {"int": _integer, "float": _number}

_FROM_SIGNATURE = object()  # Option.default when the function's parameter gives it


@dataclass(frozen=True)
class Option:
    """One option or positional argument: it fills the function's parameter of the same name
    (or `dest`), whose default and annotation give the option's default and type."""

    flag: str                        # "--top-p", or "prompt" for a positional argument
    help: str | None = None
    dest: str | None = None          # where the flag is not the parameter's name (--no-progress)
    type: Callable[[str], Any] | None = None  # where the annotation is not int or float
    choices: Sequence[str] | None = None
    nargs: str | None = None
    action: str | None = None        # "append" (repeatable); bool parameters are flags anyway
    metavar: str | None = None
    # Only where the function has no default (plots' --out) or the option is the command
    # line's alone (cli_only: translate's --file, which the CLI reads and the function never sees).
    default: Any = _FROM_SIGNATURE
    cli_only: bool = False

    @property
    def name(self) -> str:
        return self.dest or self.flag.lstrip("-").replace("-", "_")


@dataclass(frozen=True)
class Command:
    """A subcommand: `words` (["plot", "attention"]), the public function it calls ("module:name",
    imported when the command is used), its options, and `run(function, parameters)`, which
    calls it with the parsed parameters and prints the outcome."""

    words: tuple[str, ...]
    help: str
    function: str
    options: tuple[Option, ...]
    run: Callable[[Callable[..., Any], dict[str, Any]], None]
    # Parameters built from options of their own: serve's `limits` is a ServeLimits.
    grouped: Mapping[str, str] = field(default_factory=dict)

    def target(self, option: Option) -> Callable[..., Any]:
        """The function (or class) whose parameter `option` fills."""
        for where in self.grouped.values():
            if option.name in inspect.signature(_load(where)).parameters:
                return _load(where)
        return _load(self.function)

    def parameters(self, args: argparse.Namespace) -> dict[str, Any]:
        """The function's keyword arguments: exactly the parsed options, grouped ones built."""
        values = {o.name: getattr(args, o.name) for o in self.options}
        for param, where in self.grouped.items():
            cls = _load(where)
            own = inspect.signature(cls).parameters
            values[param] = cls(**{k: values.pop(k) for k in list(values) if k in own})
        return values


def _load(where: str) -> Callable[..., Any]:
    module, _, name = where.partition(":")
    return getattr(import_module(f".{module}", __package__), name)


def add_options(parser: argparse.ArgumentParser, command: Command) -> None:
    """Add the command's options to `parser`, with defaults and types from the signatures."""
    for option in command.options:
        kwargs: dict[str, Any] = {"help": option.help}
        for key in ("choices", "nargs", "action", "metavar"):
            if getattr(option, key) is not None:
                kwargs[key] = getattr(option, key)
        if option.cli_only:
            default = None if option.default is _FROM_SIGNATURE else option.default
            annotation = None
        else:
            param = inspect.signature(command.target(option)).parameters[option.name]
            has_default = param.default is not inspect.Parameter.empty
            if has_default and option.default is not _FROM_SIGNATURE:
                raise TypeError(f"{option.flag}: the default belongs to the function's signature")
            default = param.default if has_default else option.default
            annotation = param.annotation
        positional = not option.flag.startswith("-")
        if not positional:
            kwargs["dest"] = option.name
            if default is _FROM_SIGNATURE:
                kwargs["required"] = True
        if default is not _FROM_SIGNATURE:
            kwargs["default"] = default
        if isinstance(default, bool) and option.action is None:
            kwargs["action"] = "store_false" if default else "store_true"
        elif option.action is None:
            kwargs["type"] = option.type or _TYPES.get(_base_type(annotation))
        parser.add_argument(option.flag, **kwargs)


def _base_type(annotation: Any) -> str | None:
    """ "int" for `int` or `int | None` (a string under `from __future__ import annotations`)."""
    if annotation is None or annotation is inspect.Parameter.empty:
        return None
    text = annotation if isinstance(annotation, str) else inspect.formatannotation(annotation)
    return text.removesuffix(" | None")


class _CommandParser(argparse.ArgumentParser):
    """A subcommand's parser, which adds its options only when that command is used: their
    defaults come from the function's module, and importing them all (the server, matplotlib)
    would slow every command down."""

    def __init__(self, *args: Any, command: Command | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.command, self.added = command, False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        if self.command is not None and not self.added:
            add_options(self, self.command)
            self.added = True
        return super().parse_known_args(args, namespace)


# ---------------------------------------------------------------------------------------------
# What each command prints


def _train(train: Callable[..., Any], params: dict[str, Any]) -> None:
    from .device import tune_process_for_training
    tune_process_for_training()
    _print_result(train(**params))


def _print_result(result) -> None:  # TrainResult
    from .device import Distributed
    if not Distributed.from_env().main:
        return  # under torchrun, one summary (rank 0's) and one picture are enough
    from .plots import plot_training_curves
    plot_training_curves(result.out / "metrics.jsonl", result.out / "loss.png")
    summary = {"out": str(result.out), "steps": result.steps, "epochs": round(result.epochs_done, 3),
               "minutes": round(result.elapsed / 60, 2),
               "tokens_per_second": round(result.tokens_per_second),
               "planned_steps": result.planned_steps,
               "best": result.best, "stopped_early": result.stopped_early,
               "metrics": {k: round(v, 4) for k, v in result.metrics.items()}}
    print(json.dumps(summary, indent=2))


def _generate(generate_stream: Callable[..., Any], params: dict[str, Any]) -> None:
    from .generation import LoadedLM, prompt_text
    # Loaded here rather than by generate_stream for its tokenizer, which echoes the prompt;
    # precision None is fp32, as in generate_stream.
    lm = LoadedLM.load(params.pop("checkpoint"), params.pop("device"),
                       params.pop("precision") or "fp32")
    prompt, num_samples = params["prompt"], params["num_samples"]
    stream = generate_stream(lm, **params)
    # Samples run as one batch; printed live one after another needs them apart, so a single
    # sample streams token by token and several are printed as each finishes.
    if num_samples == 1:
        first = True
        for event in stream:
            if first:  # after the stream has validated the parameters
                print(prompt_text(lm.tokenizer, prompt, lm.tokenizer.encode(prompt)), end="")
                first = False
            print(event.text, end="", flush=True)
        if first:  # --max-new-tokens 0: no event came, and the output is the prompt alone
            print(prompt_text(lm.tokenizer, prompt, lm.tokenizer.encode(prompt)), end="")
        print()
        return
    texts: dict[int, str] = {}
    for event in stream:
        texts[event.sample] = texts.get(event.sample, "") + event.text
    shown = prompt_text(lm.tokenizer, prompt, lm.tokenizer.encode(prompt))
    for s in range(num_samples):
        print(f"--- sample {s + 1}")
        print(shown + texts.get(s, ""))


def _translate(translate: Callable[..., Any], params: dict[str, Any]) -> None:
    from .translator import loaded_translator
    checkpoint, device = params.pop("checkpoint"), params.pop("device")
    text, file = params.pop("text"), params.pop("file")
    from_input = text is None or text == "-"
    if not from_input and file is not None:
        raise ScrivenError("give either a TEXT argument or --file, not both")
    tr = loaded_translator(checkpoint, device, params.pop("precision"))
    n_best = params["n_best"]
    if not from_input:
        _print_translations(translate(tr, [text], names=["TEXT"], **params), 1, n_best)
        return
    where = file or "stdin"
    # One sentence per line, translated a chunk at a time so output flows for long inputs.
    chunk: list[str] = []
    first = 1
    for number, line in enumerate(_input_lines(file), start=1):
        chunk.append(line)
        if len(chunk) == 16 * params["batch_size"]:
            names = [f"{where} line {first + i}" for i in range(len(chunk))]
            _print_translations(translate(tr, chunk, names=names, **params), first, n_best)
            chunk, first = [], number + 1
    if chunk:
        names = [f"{where} line {first + i}" for i in range(len(chunk))]
        _print_translations(translate(tr, chunk, names=names, **params), first, n_best)


def _input_lines(file: str | None):  # -> Iterator[str]
    """Lines of a UTF-8 file (or stdin when None), without their line ends."""
    try:
        stream = open(file, "rb") if file is not None else sys.stdin.buffer
    except OSError as e:
        raise ScrivenError(f"{file}: cannot read ({e.strerror})") from None
    with stream:
        for number, raw in enumerate(stream, start=1):
            try:
                yield raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise ScrivenError(f"{file or 'stdin'} line {number}: not valid UTF-8") from None


def _print_translations(results: list, first: int, n_best: int) -> None:
    """One translation per line; with --n-best, `sentence<TAB>score<TAB>translation` lines."""
    for i, result in enumerate(results):
        if n_best == 1:
            print(result)
        else:
            for text, score in result:
                print(f"{first + i}\t{score:.4f}\t{text}")
    sys.stdout.flush()


def _print_returned(function: Callable[..., Any], params: dict[str, Any]) -> None:
    print(function(**params))


def _print_json(function: Callable[..., Any], params: dict[str, Any]) -> None:
    print(json.dumps(function(**params), indent=2))


def _print_datasets(list_datasets: Callable[..., Any], params: dict[str, Any]) -> None:
    for d in list_datasets(**params):
        print(f"{d.name:10} {d.filename:14} {d.licence:22} {d.description}")


def _print_out(plot: Callable[..., Any], params: dict[str, Any]) -> None:
    plot(**params)
    print(params["out"])


def _print_attention(plot: Callable[..., Any], params: dict[str, Any]) -> None:
    found = plot(**params)
    print(f"{params['out']}: layer {found['layer'] + 1}, translation: {found['translation']}")


def _print_positions(plot: Callable[..., Any], params: dict[str, Any]) -> None:
    found = plot(**params)
    print(f"{params['out']}: {tuple(found['encoding'].shape)}")


def _print_kept(plot: Callable[..., Any], params: dict[str, Any]) -> None:
    found = plot(**params)
    print(json.dumps({"out": params["out"],
                      "kept": {f"{t:g}": n for t, n in found["kept"].items()}}))


def _print_neighbours(plot: Callable[..., Any], params: dict[str, Any]) -> None:
    found = plot(**params)
    for word, near in found["neighbours"].items():
        print(f"{word}: " + ", ".join(f"{t} {c:.2f}" for t, c in near))


def _call(function: Callable[..., Any], params: dict[str, Any]) -> None:
    function(**params)  # it prints what it has to say (the server its address)


# ---------------------------------------------------------------------------------------------
# The commands


_TRAINING = (
    Option("--out", "run folder: latest/, best/, metrics.jsonl, loss.png"),
    Option("--epochs", "passes over the training data"),
    Option("--minutes", "wall-clock budget (default 10 if no length is given)"),
    Option("--max-steps", "optimizer steps"),
    Option("--lr", "peak learning rate (default: the preset's, or auto's choice)"),
    Option("--warmup-steps", "steps of learning-rate warmup (default: --warmup-fraction of the "
                             "plan)"),
    Option("--warmup-fraction", "warmup as a fraction of the planned steps; a --minutes run "
                                "plans its steps from its speed in its first steps"),
    Option("--schedule", "learning rate after warmup: cosine or linear decay over the plan, "
                         "inverse square root of the step, or constant",
           choices=SCHEDULES),
    Option("--eval-every", "steps between validations (default: --evals-per-run over the plan)"),
    Option("--evals-per-run", "validations spread over the planned steps (text generators 10, "
                              "translators 5)"),
    Option("--patience", "stop after this many validations without improvement (0 = never)"),
    Option("--amp", "precision of training steps: bf16/fp16 autocast, bf16-pure (bf16 copy of "
                    "the model, fp32 master weights), off (fp32); auto: the fastest measured "
                    "where the hardware has bf16", choices=AMP_MODES),
    Option("--device", "auto, cpu, cuda or cuda:N"),
    Option("--seed"),
    Option("--resume", "continue OUT/latest exactly (same settings and data)"),
    Option("--overwrite", "replace the run already in OUT (default: that is an error)"),
    Option("--log-every", "steps between log lines"),
    Option("--compile", "torch.compile the model (GPU runs)"),
    Option("--optimizer", "adamw, or muon: Muon for the hidden matrices, AdamW for embeddings, "
                          "heads, biases and norms", choices=OPTIMIZERS),
    Option("--no-progress", "no progress bar", dest="progress"),
)


def _picture(default: str) -> tuple[Option, ...]:
    return (Option("--out", f"a .png or .svg file (default {default})", default=default),
            Option("--device"))


COMMANDS: tuple[Command, ...] = (
    Command(("data", "list"), "registered datasets", "data:list_datasets", (), _print_datasets),
    Command(("data", "fetch"), "download (or take from SCRIVEN_DATA_MIRROR) and cache",
            "data:fetch", (Option("name"),), _print_returned),
    Command(("train", "lm"), "next-token text generator", "lm:train_lm", (
        Option("text", "a text file or a dataset name (e.g. anna)"),
        Option("--model", "lstm (recurrent) or gpt (decoder-only Transformer)",
               choices=["lstm", "gpt"]),
        Option("--preset", "model size: default, seed (the book's), tiny, gpu; lstm also "
               "large; auto: timed on this machine for --minutes (see scriven.sizing). "
               "Default: auto given only --minutes, else default"),
        Option("--tokenizer", choices=["word", "char", "bpe"]),
        Option("--min-count", "word: rarer words become <unk>"),
        Option("--vocab-size", "bpe: vocabulary size"),
        Option("--batch-size", "parallel streams (default 32, or auto's choice)"),
        Option("--seq-len", "tokens per training window (default 64, or auto's choice)"),
        Option("--dropout"),
        Option("--positions", "gpt: learned, sinusoidal or alibi (default: the preset's; "
                              "default and auto: alibi, learned on characters)"),
        *_TRAINING), _train),
    Command(("train", "translate"), "English→French (or any pair file) translator",
            "translation:train_translate", (
        Option("pairs", "a TSV/CSV sentence-pair file or a dataset name (eng-fra)"),
        Option("--preset", "model size: default, seed (the book's), tiny, gpu"),
        Option("--vocab-size", "joint BPE vocabulary"),
        Option("--max-words", "drop pairs with a longer side"),
        Option("--strict", "a malformed line is an error"),
        Option("--max-tokens", "padded tokens per batch, per process (default: the preset's, "
                               "2048 for default)"),
        Option("--label-smoothing"),
        Option("--dropout", "override the preset's dropout (default: 0 when the budget holds "
                            "up to 4 passes over the pairs, else the preset's)"),
        Option("--bleu-sentences", "validation pairs translated for BLEU at each validation"),
        *_TRAINING), _train),
    Command(("generate",), "continue a prompt with a trained text generator",
            "generation:generate_stream", (
        Option("checkpoint", "a checkpoint directory or run folder"),
        Option("prompt"),
        Option("--max-new-tokens"),
        Option("--temperature", "0 = greedy"),
        Option("--top-k"),
        Option("--top-p"),
        Option("--repetition-penalty"),
        Option("--stop", "stop at this string (repeatable)", action="append"),
        Option("--seed"),
        Option("--num-samples"),
        Option("--device"),
        Option("--precision", "fp32, bf16 or int8: how the weights are held (bf16, int8 "
                              "generate faster)")), _generate),
    Command(("translate",), "translate with a trained translator", "translator:translate", (
        Option("checkpoint", "a checkpoint directory or run folder"),
        Option("text", "the sentence; absent or - : one sentence per line from --file or stdin",
               nargs="?"),
        Option("--file", "translate this file, one sentence per line", cli_only=True),
        Option("--beam", "1 = greedy"),
        Option("--n-best", "print this many hypotheses per sentence (at most --beam)"),
        Option("--length-penalty", "GNMT alpha for beam search"),
        Option("--max-len", "longest translation in tokens"),
        Option("--batch-size", "sentences per batch"),
        Option("--device"),
        Option("--precision", "fp32, bf16 or int8: how the weights are held (int8 decodes "
                              "faster on CPUs)")), _translate),
    Command(("evaluate",), "perplexity/bits per char (LM) or BLEU/chrF (translator)",
            "evaluation:evaluate", (
        Option("checkpoint"),
        Option("text", "a text file, pair file or dataset name"),
        Option("--device"),
        Option("--beam", "translators: beam size"),
        Option("--length-penalty", "translators: GNMT length-penalty exponent for beam search"),
        Option("--split", "translators on their own training data: test (default) or valid"),
        Option("--precision", "translators: fp32 (default), bf16 or int8 weights")),
        _print_json),
    Command(("export",), "write a model for ONNX Runtime (LSTM, GPT) or CTranslate2 (translator)",
            "export:export", (
        Option("checkpoint", "a checkpoint directory or run folder"),
        Option("--format", "onnx (LSTM, GPT) or ctranslate2 (translator)"),
        Option("--out", "the export directory to write"),
        Option("--quantization", "onnx: float32 (default), int8; ctranslate2: float32 (default), "
                                 "int8, int8_float32, bfloat16")), _print_returned),
    Command(("plot", "curves"), "training and validation loss of a run",
            "plots:plot_training_curves", (
        Option("metrics", "a run folder or its metrics.jsonl", metavar="run"),
        Option("--out", "a .png or .svg file", default="loss.png")), _print_out),
    Command(("plot", "attention"), "attention heatmaps of one translation, per head",
            "plots:plot_attention", (
        Option("checkpoint", "a translator checkpoint or run folder"),
        Option("source", "the sentence to translate"),
        Option("--target", "teacher-force this translation (default: the model's own)"),
        Option("--layer", "layer, from 0 (negative: from the end)"),
        Option("--kinds", nargs="+", choices=["encoder_self", "decoder_self", "cross"]),
        *_picture("attention.png")), _print_attention),
    Command(("plot", "positions"), "positional encodings and their dot products",
            "plots:plot_positional_encoding", (
        Option("--checkpoint", "a translator: its own table (default: the formula)"),
        Option("--max-len", "positions"),
        Option("--d-model", "dimensions"),
        *_picture("positions.png")), _print_positions),
    Command(("plot", "next-token"), "next-token distribution at several temperatures",
            "plots:plot_next_token", (
        Option("checkpoint", "a language-model checkpoint or run folder"),
        Option("prompt"),
        Option("--temperatures", type=_number, nargs="+"),
        Option("--top-k"),
        Option("--top-p"),
        Option("--show", "tokens shown"),
        *_picture("next-token.png")), _print_kept),
    Command(("plot", "embeddings"), "nearest words and a 2-D projection (PCA)",
            "plots:plot_embeddings", (
        Option("checkpoint", "any checkpoint or run folder"),
        Option("words", nargs="+"),
        Option("--neighbours"),
        *_picture("embeddings.png")), _print_neighbours),
    Command(("serve",), "HTTP API and web playground for checkpoints and exports",
            "serve.app:serve", (
        Option("checkpoints", "checkpoints, run folders or export directories (language models "
                              "and translators); NAME=PATH names one", nargs="+", metavar="CKPT"),
        Option("--host", "address to listen on (default: this machine only)"),
        Option("--port"),
        Option("--allowed-hosts", "Host header names to answer (default: localhost, 127.0.0.1, "
                                  "::1 and --host); *.example.com and * work",
               nargs="+", metavar="HOST"),
        Option("--api-key", "require 'Authorization: Bearer KEY' on /v1/ routes (default: "
                            "$SCRIVEN_API_KEY; none if unset)"),
        Option("--device"),
        Option("--threads", "torch threads per operation"),
        Option("--precision", "fp32, bf16 or int8: how generators and translators hold their weights "
                              "(an export keeps the quantization it was exported with)"),
        Option("--max-new-tokens", "cap per request"),
        Option("--max-beam", "cap per request"),
        Option("--max-batch", "rows decoded together in one step"),
        Option("--max-body-bytes"),
        Option("--timeout", "seconds per request", dest="request_timeout", metavar="TIMEOUT"),
        Option("--log-level", choices=["critical", "error", "warning", "info", "debug"])),
        _call, grouped={"limits": "serve.app:ServeLimits"}),
)

# The help of the words that group commands.
_GROUPS = {"data": "datasets by name", "train": "train a model",
           "plot": "pictures of what happens inside a model (PNG or SVG)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scriven", description="Train, evaluate, inspect and serve small generative text models.")
    groups: dict[tuple[str, ...], Any] = {
        (): parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)}
    for command in COMMANDS:
        *group, word = command.words
        key = tuple(group)
        if key not in groups:
            above = groups[key[:-1]].add_parser(key[-1], help=_GROUPS[key[-1]])
            groups[key] = above.add_subparsers(dest=f"{key[-1]}_command", required=True,
                                               parser_class=_CommandParser)
        leaf = groups[key].add_parser(word, help=command.help, command=command)
        leaf.set_defaults(run_command=command)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    warnings.showwarning = _one_line_warnings
    args = build_parser().parse_args(argv)
    command: Command = args.run_command
    try:
        command.run(_load(command.function), command.parameters(args))
    except ScrivenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
