"""The command line: each subcommand parses its arguments and calls one public function with the
same parameter names (`scriven generate --top-p 0.9` -> `scriven.generate(..., top_p=0.9)`)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence

from .device import AMP_MODES
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
    p.add_argument("--warmup-steps", type=_positive_int,
                   help="steps of learning-rate warmup (default: --warmup-fraction of the plan)")
    p.add_argument("--warmup-fraction", type=_number, default=0.05,
                   help="warmup as a fraction of the planned steps; a --minutes run plans its "
                        "steps from its speed in its first steps")
    p.add_argument("--eval-every", type=_positive_int,
                   help="steps between validations (default: --evals-per-run over the plan)")
    p.add_argument("--evals-per-run", type=_positive_int,
                   help="validations spread over the planned steps (text generators 10, "
                        "translators 5)")
    p.add_argument("--patience", type=_positive_int, default=0,
                   help="stop after this many validations without improvement (0 = never)")
    p.add_argument("--amp", choices=AMP_MODES, default="auto",
                   help="precision of training steps: bf16/fp16 autocast, bf16-pure (bf16 copy "
                        "of the model, fp32 master weights), off (fp32); auto: the fastest "
                        "measured where the hardware has bf16")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=_positive_int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue OUT/latest exactly (same settings and data)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in OUT (default: that is an error)")
    p.add_argument("--log-every", type=_positive_int, default=20, help="steps between log lines")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU runs)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _cmd_train_lm(a: argparse.Namespace) -> None:
    from .device import tune_process_for_training
    from .lm import train_lm
    tune_process_for_training()
    result = train_lm(a.text, a.out, preset=a.preset, model=a.model, tokenizer=a.tokenizer,
                      min_count=a.min_count, vocab_size=a.vocab_size, epochs=a.epochs,
                      minutes=a.minutes, max_steps=a.max_steps, batch_size=a.batch_size,
                      seq_len=a.seq_len, lr=a.lr, dropout=a.dropout,
                      warmup_steps=a.warmup_steps, warmup_fraction=a.warmup_fraction,
                      eval_every=a.eval_every, evals_per_run=a.evals_per_run,
                      patience=a.patience, amp=a.amp, device=a.device, seed=a.seed,
                      resume=a.resume, log_every=a.log_every, compile=a.compile, progress=a.progress,
                      overwrite=a.overwrite)
    _print_result(result)


def _cmd_train_translate(a: argparse.Namespace) -> None:
    from .device import tune_process_for_training
    from .translation import train_translate
    tune_process_for_training()
    result = train_translate(a.pairs, a.out, preset=a.preset, vocab_size=a.vocab_size,
                             max_words=a.max_words, strict=a.strict, epochs=a.epochs,
                             minutes=a.minutes, max_steps=a.max_steps, max_tokens=a.max_tokens,
                             lr=a.lr, warmup_steps=a.warmup_steps,
                             warmup_fraction=a.warmup_fraction,
                             evals_per_run=a.evals_per_run,
                             label_smoothing=a.label_smoothing, dropout=a.dropout,
                             eval_every=a.eval_every, patience=a.patience,
                             bleu_sentences=a.bleu_sentences, amp=a.amp, device=a.device,
                             seed=a.seed, resume=a.resume, log_every=a.log_every,
                             compile=a.compile, progress=a.progress, overwrite=a.overwrite)
    _print_result(result)


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


def _cmd_generate(a: argparse.Namespace) -> None:
    from .generation import LoadedLM, generate_stream, prompt_text
    lm = LoadedLM.load(a.checkpoint, a.device, a.precision)
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
        if first:  # --max-new-tokens 0: no event came, and the output is the prompt alone
            print(prompt_text(lm.tokenizer, a.prompt, lm.tokenizer.encode(a.prompt)), end="")
        print()
        return
    texts: dict[int, str] = {}
    for event in stream:
        texts[event.sample] = texts.get(event.sample, "") + event.text
    shown = prompt_text(lm.tokenizer, a.prompt, lm.tokenizer.encode(a.prompt))
    for s in range(a.num_samples):
        print(f"--- sample {s + 1}")
        print(shown + texts.get(s, ""))


def _cmd_translate(a: argparse.Namespace) -> None:
    from .export import is_export
    from .runtimes import load_translator
    from .translation import LoadedTranslator, translate
    from_input = a.text is None or a.text == "-"
    if not from_input and a.file is not None:
        raise ScrivenError("give either a TEXT argument or --file, not both")
    if is_export(a.checkpoint):  # an exported translator runs on CTranslate2
        tr = load_translator(a.checkpoint, a.device)
    else:
        tr = LoadedTranslator.load(a.checkpoint, a.device)
    options = dict(beam=a.beam, n_best=a.n_best, length_penalty=a.length_penalty,
                   max_len=a.max_len, batch_size=a.batch_size)
    if not from_input:
        _print_translations(translate(tr, [a.text], names=["TEXT"], **options), 1, a.n_best)
        return
    where = a.file or "stdin"
    # One sentence per line, translated a chunk at a time so output flows for long inputs.
    chunk: list[str] = []
    first = 1
    for number, line in enumerate(_input_lines(a.file), start=1):
        chunk.append(line)
        if len(chunk) == 16 * a.batch_size:
            names = [f"{where} line {first + i}" for i in range(len(chunk))]
            _print_translations(translate(tr, chunk, names=names, **options), first, a.n_best)
            chunk, first = [], number + 1
    if chunk:
        names = [f"{where} line {first + i}" for i in range(len(chunk))]
        _print_translations(translate(tr, chunk, names=names, **options), first, a.n_best)


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


def _cmd_evaluate(a: argparse.Namespace) -> None:
    from .evaluation import evaluate
    print(json.dumps(evaluate(a.checkpoint, a.text, device=a.device, beam=a.beam,
                              length_penalty=a.length_penalty, split=a.split), indent=2))


def _cmd_data_list(a: argparse.Namespace) -> None:
    from .data import list_datasets
    for d in list_datasets():
        print(f"{d.name:10} {d.filename:14} {d.licence:22} {d.description}")


def _cmd_data_fetch(a: argparse.Namespace) -> None:
    from .data import fetch
    print(fetch(a.name))


def _cmd_plot_curves(a: argparse.Namespace) -> None:
    from .plots import plot_training_curves
    plot_training_curves(a.run, a.out)
    print(a.out)


def _cmd_plot_attention(a: argparse.Namespace) -> None:
    from .plots import plot_attention
    found = plot_attention(a.checkpoint, a.source, a.out, target=a.target, layer=a.layer,
                           kinds=a.kinds, device=a.device)
    print(f"{a.out}: layer {found['layer'] + 1}, translation: {found['translation']}")


def _cmd_plot_positions(a: argparse.Namespace) -> None:
    from .plots import plot_positional_encoding
    found = plot_positional_encoding(a.out, max_len=a.max_len, d_model=a.d_model,
                                     checkpoint=a.checkpoint, device=a.device)
    print(f"{a.out}: {tuple(found['encoding'].shape)}")


def _cmd_plot_next_token(a: argparse.Namespace) -> None:
    from .plots import plot_next_token
    found = plot_next_token(a.checkpoint, a.prompt, a.out, temperatures=a.temperatures,
                            top_k=a.top_k, top_p=a.top_p, show=a.show, device=a.device)
    print(json.dumps({"out": a.out, "kept": {f"{t:g}": n for t, n in found["kept"].items()}}))


def _cmd_plot_embeddings(a: argparse.Namespace) -> None:
    from .plots import plot_embeddings
    found = plot_embeddings(a.checkpoint, a.words, a.out, neighbours=a.neighbours, device=a.device)
    for word, near in found["neighbours"].items():
        print(f"{word}: " + ", ".join(f"{t} {c:.2f}" for t, c in near))


def _cmd_export(a: argparse.Namespace) -> None:
    from .export import export
    print(export(a.checkpoint, a.format, a.out, quantization=a.quantization))


def _cmd_serve(a: argparse.Namespace) -> None:
    from .serve import ServeLimits, serve
    limits = ServeLimits(max_new_tokens=a.max_new_tokens, max_beam=a.max_beam,
                         max_batch=a.max_batch, request_timeout=a.timeout,
                         max_body_bytes=a.max_body_bytes)
    serve(a.checkpoints, host=a.host, port=a.port, device=a.device, limits=limits,
          threads=a.threads, log_level=a.log_level, precision=a.precision,
          allowed_hosts=a.allowed_hosts, api_key=a.api_key)


def _add_plot_parsers(sub) -> None:
    plot = sub.add_parser("plot", help="pictures of what happens inside a model (PNG or SVG)")
    kinds = plot.add_subparsers(dest="plot_command", required=True)

    def out(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--out", default=default, help=f"a .png or .svg file (default {default})")
        p.add_argument("--device", default="auto")

    c = kinds.add_parser("curves", help="training and validation loss of a run")
    c.add_argument("run", help="a run folder or its metrics.jsonl")
    c.add_argument("--out", default="loss.png", help="a .png or .svg file")
    c.set_defaults(func=_cmd_plot_curves)

    at = kinds.add_parser("attention", help="attention heatmaps of one translation, per head")
    at.add_argument("checkpoint", help="a translator checkpoint or run folder")
    at.add_argument("source", help="the sentence to translate")
    at.add_argument("--target", help="teacher-force this translation (default: the model's own)")
    at.add_argument("--layer", type=int, default=0, help="layer, from 0 (negative: from the end)")
    at.add_argument("--kinds", nargs="+", default=["encoder_self", "decoder_self", "cross"],
                    choices=["encoder_self", "decoder_self", "cross"])
    out(at, "attention.png")
    at.set_defaults(func=_cmd_plot_attention)

    po = kinds.add_parser("positions", help="positional encodings and their dot products")
    po.add_argument("--checkpoint", help="a translator: its own table (default: the formula)")
    po.add_argument("--max-len", type=_positive_int, default=64, help="positions")
    po.add_argument("--d-model", type=_positive_int, default=128, help="dimensions")
    out(po, "positions.png")
    po.set_defaults(func=_cmd_plot_positions)

    nt = kinds.add_parser("next-token", help="next-token distribution at several temperatures")
    nt.add_argument("checkpoint", help="a language-model checkpoint or run folder")
    nt.add_argument("prompt")
    nt.add_argument("--temperatures", type=_number, nargs="+", default=[0.5, 1.0, 1.5])
    nt.add_argument("--top-k", type=_positive_int)
    nt.add_argument("--top-p", type=_number)
    nt.add_argument("--show", type=_positive_int, default=20, help="tokens shown")
    out(nt, "next-token.png")
    nt.set_defaults(func=_cmd_plot_next_token)

    em = kinds.add_parser("embeddings", help="nearest words and a 2-D projection (PCA)")
    em.add_argument("checkpoint", help="any checkpoint or run folder")
    em.add_argument("words", nargs="+")
    em.add_argument("--neighbours", type=_positive_int, default=8)
    out(em, "embeddings.png")
    em.set_defaults(func=_cmd_plot_embeddings)


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="HTTP API and web playground for checkpoints")
    s.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="checkpoints or run folders (language models and translators); "
                        "NAME=PATH names one")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this "
                                                      "machine only)")
    s.add_argument("--port", type=_positive_int, default=8000)
    s.add_argument("--allowed-hosts", nargs="+", metavar="HOST",
                   help="Host header names to answer (default: localhost, 127.0.0.1, ::1 and "
                        "--host); *.example.com and * work")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ routes "
                                     "(default: $SCRIVEN_API_KEY; none if unset)")
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=_positive_int, help="torch threads per operation")
    s.add_argument("--precision", default="fp32",
                   help="fp32, bf16 or int8: how text generators hold their weights")
    s.add_argument("--max-new-tokens", type=_positive_int, default=512, help="cap per request")
    s.add_argument("--max-beam", type=_positive_int, default=8, help="cap per request")
    s.add_argument("--max-batch", type=_positive_int, default=64,
                   help="rows decoded together in one step")
    s.add_argument("--max-body-bytes", type=_positive_int, default=64 * 1024)
    s.add_argument("--timeout", type=_number, default=60.0, help="seconds per request")
    s.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug"])
    s.set_defaults(func=_cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scriven", description="Train, evaluate, inspect and serve small generative text models.")
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
    lm.add_argument("--preset", default="default",
                    help="model size: default, seed (the book's), tiny; lstm also large")
    lm.add_argument("--tokenizer", default="word", choices=["word", "char", "bpe"])
    lm.add_argument("--min-count", type=_positive_int, default=1, help="word: rarer words become <unk>")
    lm.add_argument("--vocab-size", type=_positive_int, default=8000, help="bpe: vocabulary size")
    lm.add_argument("--batch-size", type=_positive_int, default=32, help="parallel streams")
    lm.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per BPTT window")
    lm.add_argument("--dropout", type=_number)
    _add_training_length(lm)
    lm.set_defaults(func=_cmd_train_lm, evals_per_run=10)

    tt = train.add_parser("translate", help="English→French (or any pair file) translator")
    tt.add_argument("pairs", help="a TSV/CSV sentence-pair file or a dataset name (eng-fra)")
    tt.add_argument("--preset", default="default", help="model size: default, seed (the book's), tiny")
    tt.add_argument("--vocab-size", type=_positive_int, default=8000, help="joint BPE vocabulary")
    tt.add_argument("--max-words", type=_positive_int, help="drop pairs with a longer side")
    tt.add_argument("--strict", action="store_true", help="a malformed line is an error")
    tt.add_argument("--max-tokens", type=_positive_int, default=4096,
                    help="padded tokens per batch (per process)")
    tt.add_argument("--label-smoothing", type=_number, default=0.1)
    tt.add_argument("--dropout", type=_number, help="override the preset's dropout")
    tt.add_argument("--bleu-sentences", type=_positive_int, default=500,
                    help="validation pairs translated for BLEU at each validation")
    _add_training_length(tt)
    tt.set_defaults(func=_cmd_train_translate, evals_per_run=5)

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
    g.add_argument("--precision", default="fp32",
                   help="fp32, bf16 or int8: how the weights are held (bf16, int8 generate faster)")
    g.set_defaults(func=_cmd_generate)

    t = sub.add_parser("translate", help="translate with a trained translator")
    t.add_argument("checkpoint", help="a checkpoint directory or run folder")
    t.add_argument("text", nargs="?", help="the sentence; absent or - : one sentence per line "
                   "from --file or stdin")
    t.add_argument("--file", help="translate this file, one sentence per line")
    t.add_argument("--beam", type=_positive_int, default=1, help="1 = greedy")
    t.add_argument("--n-best", type=_positive_int, default=1,
                   help="print this many hypotheses per sentence (at most --beam)")
    t.add_argument("--length-penalty", type=_number, default=1.0, help="GNMT alpha for beam search")
    t.add_argument("--max-len", type=_positive_int, help="longest translation in tokens")
    t.add_argument("--batch-size", type=_positive_int, default=64, help="sentences per batch")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=_cmd_translate)

    e = sub.add_parser("evaluate", help="perplexity/bits per char (LM) or BLEU/chrF (translator)")
    e.add_argument("checkpoint")
    e.add_argument("text", help="a text file, pair file or dataset name")
    e.add_argument("--device", default="auto")
    e.add_argument("--beam", type=_positive_int, default=1, help="translators: beam size")
    e.add_argument("--length-penalty", type=_number, default=1.0,
                   help="translators: GNMT length-penalty exponent for beam search")
    e.add_argument("--split", default="test",
                   help="translators on their own training data: test (default) or valid")
    e.set_defaults(func=_cmd_evaluate)

    x = sub.add_parser("export", help="write a model for ONNX Runtime (LSTM, GPT) or "
                       "CTranslate2 (translator)")
    x.add_argument("checkpoint", help="a checkpoint directory or run folder")
    x.add_argument("--format", required=True, help="onnx (LSTM, GPT) or ctranslate2 (translator)")
    x.add_argument("--out", required=True, help="the export directory to write")
    x.add_argument("--quantization", help="onnx: float32 (default), int8; ctranslate2: float32 "
                   "(default), int8, int8_float32, bfloat16")
    x.set_defaults(func=_cmd_export)

    _add_plot_parsers(sub)
    _add_serve_parser(sub)
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
