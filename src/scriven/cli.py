"""The command line: each subcommand parses its arguments and calls one public function with the
same parameter names (`scriven generate --top-p 0.9` -> `scriven.generate(..., top_p=0.9)`)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence

from .errors import ScrivenError


def _positive_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def _add_training_length(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder: latest/, best/, metrics.jsonl, loss.png")
    p.add_argument("--epochs", type=_positive_int, help="passes over the training data")
    p.add_argument("--minutes", type=_number, help="wall-clock budget (default 10 if no length is given)")
    p.add_argument("--max-steps", type=_positive_int, help="optimizer steps")
    p.add_argument("--lr", type=_number, help="peak learning rate")
    p.add_argument("--eval-every", type=_positive_int, default=200, help="steps between validations")
    p.add_argument("--patience", type=_positive_int, default=0,
                   help="stop after this many validations without improvement (0 = never)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision (auto: bf16 where the hardware has it)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=_positive_int, default=0)
    p.add_argument("--resume", action="store_true", help="continue OUT/latest exactly")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _cmd_train_lm(a: argparse.Namespace) -> None:
    from .lm import train_lm
    result = train_lm(a.text, a.out, preset=a.preset, model=a.model, tokenizer=a.tokenizer,
                      min_count=a.min_count, vocab_size=a.vocab_size, epochs=a.epochs,
                      minutes=a.minutes, max_steps=a.max_steps, batch_size=a.batch_size,
                      seq_len=a.seq_len, lr=a.lr, dropout=a.dropout, eval_every=a.eval_every,
                      patience=a.patience, amp=a.amp, device=a.device, seed=a.seed,
                      resume=a.resume, progress=a.progress)
    _print_result(result)


def _print_result(result) -> None:  # TrainResult
    summary = {"out": str(result.out), "steps": result.steps, "epochs": round(result.epochs_done, 3),
               "minutes": round(result.elapsed / 60, 2),
               "tokens_per_second": round(result.tokens_per_second),
               "best": result.best, "stopped_early": result.stopped_early,
               "metrics": {k: round(v, 4) for k, v in result.metrics.items()}}
    print(json.dumps(summary, indent=2))


def _cmd_generate(a: argparse.Namespace) -> None:
    from .generate import LoadedLM, generate_stream, prompt_text
    lm = LoadedLM.load(a.checkpoint, a.device)
    stream = generate_stream(lm, a.prompt, max_new_tokens=a.max_new_tokens,
                             temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                             repetition_penalty=a.repetition_penalty, stop=a.stop, seed=a.seed,
                             num_samples=a.num_samples)
    # Samples run as one batch; printed live one after another needs them apart, so a single
    # sample streams token by token and several are printed as each finishes.
    if a.num_samples == 1:
        first = True
        for event in stream:
            if first:  # after the stream has validated the parameters
                print(prompt_text(lm.tokenizer, a.prompt, lm.tokenizer.encode(a.prompt)), end="")
                first = False
            print(event.text, end="", flush=True)
        print()
        return
    texts: dict[int, str] = {}
    for event in stream:
        texts[event.sample] = texts.get(event.sample, "") + event.text
    shown = prompt_text(lm.tokenizer, a.prompt, lm.tokenizer.encode(a.prompt))
    for s in range(a.num_samples):
        print(f"--- sample {s + 1}")
        print(shown + texts.get(s, ""))


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from .evaluate import evaluate
    print(json.dumps(evaluate(a.checkpoint, a.text, device=a.device), indent=2))


def _cmd_data_list(a: argparse.Namespace) -> None:
    from .data import list_datasets
    for d in list_datasets():
        print(f"{d.name:10} {d.filename:14} {d.licence:22} {d.description}")


def _cmd_data_fetch(a: argparse.Namespace) -> None:
    from .data import fetch
    print(fetch(a.name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scriven", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets by name").add_subparsers(dest="data_command", required=True)
    data.add_parser("list", help="registered datasets").set_defaults(func=_cmd_data_list)
    f = data.add_parser("fetch", help="download (or take from SCRIVEN_DATA_MIRROR) and cache")
    f.add_argument("name")
    f.set_defaults(func=_cmd_data_fetch)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="train_command", required=True)
    lm = train.add_parser("lm", help="next-token text generator")
    lm.add_argument("text", help="a text file or a dataset name (e.g. anna)")
    lm.add_argument("--model", default="lstm", choices=["lstm", "gpt"],
                    help="lstm (recurrent) or gpt (decoder-only Transformer)")
    lm.add_argument("--preset", default="default", help="model size: default, seed (the book's), tiny")
    lm.add_argument("--tokenizer", default="word", choices=["word", "char", "bpe"])
    lm.add_argument("--min-count", type=_positive_int, default=1, help="word: rarer words become <unk>")
    lm.add_argument("--vocab-size", type=_positive_int, default=8000, help="bpe: vocabulary size")
    lm.add_argument("--batch-size", type=_positive_int, default=32, help="parallel streams")
    lm.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per BPTT window")
    lm.add_argument("--dropout", type=_number)
    _add_training_length(lm)
    lm.set_defaults(func=_cmd_train_lm)

    g = sub.add_parser("generate", help="continue a prompt with a trained text generator")
    g.add_argument("checkpoint", help="a checkpoint directory or run folder")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=_positive_int, default=200)
    g.add_argument("--temperature", type=_number, default=1.0, help="0 = greedy")
    g.add_argument("--top-k", type=_positive_int)
    g.add_argument("--top-p", type=_number)
    g.add_argument("--repetition-penalty", type=_number, default=1.0)
    g.add_argument("--stop", action="append", help="stop at this string (repeatable)")
    g.add_argument("--seed", type=_positive_int)
    g.add_argument("--num-samples", type=_positive_int, default=1)
    g.add_argument("--device", default="auto")
    g.set_defaults(func=_cmd_generate)

    e = sub.add_parser("evaluate", help="perplexity/bits per char (LM) or BLEU/chrF (translator)")
    e.add_argument("checkpoint")
    e.add_argument("text", help="a text file, pair file or dataset name")
    e.add_argument("--device", default="auto")
    e.set_defaults(func=_cmd_evaluate)
    return parser


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    warnings.showwarning = _one_line_warnings
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
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
