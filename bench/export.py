"""Benchmark of exported models against scriven's own PyTorch path. Prints one JSON summary.

  translator: sentences/s for batched greedy and beam-4 search (64 sentences a batch) on held-out
      eng-fra test sentences, scriven (fp32, and its own int8) vs CTranslate2 float32 and int8
      exports of the same checkpoint, and each one's BLEU (sacrebleu, cased, 13a) on those sentences. Beam search
      uses length penalty 1.0 on both: GNMT's ((5 + n) / 6)^1 in scriven, n^1 in CTranslate2.
  language model: tokens/s generating `--tokens` tokens (temperature 1, scriven's sampler) for one
      stream and for `--streams` streams at once, scriven fp32 and int8 vs ONNX Runtime float32
      and int8 exports of the same LSTM checkpoint; the same with steps only (no sampling
      between them: the runtime's ceiling); the draw alone, native kernel against PyTorch; and
      each one's validation perplexity on the checkpoint's own split of Anna Karenina, read one
      token at a time (64 streams) through that runtime's step.
  Targets (for the record): CTranslate2 int8 beam 4 ≥ 3× scriven's beam-4 sentences/s with BLEU
      within 0.3; ONNX Runtime ≥ 5,000 tok/s single stream and ≥ 50,000 tok/s for 64 streams,
      at a perplexity within 1 % of scriven fp32's.

Without `--translator` / `--lm`, models are trained here for `--minutes` / `--lm-minutes` (the
default presets; speeds do not depend on how long they trained, BLEU does).

    SCRIVEN_DATA_MIRROR=../shared/data python bench/export.py                  # about 5 minutes
    python bench/export.py --translator RUN/best --lm LMRUN/best --profile portable
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import sacrebleu
import torch
from lm import stepper_perplexity
from machine import add_profile_argument, enter_profile, machine_info

from scriven import runtimes
from scriven.data import read_text, resolve_text_source
from scriven.export import export
from scriven.generation import LoadedLM, encode_prompt, sample_ids
from scriven.lm import _cut_text, train_lm
from scriven.translation import load_pairs, train_translate
from scriven.translator import LoadedTranslator, translate


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def translator_figures(checkpoint: Path, folder: Path, sentences: list[str],
                       references: list[str], threads: int) -> dict:
    engines = {name: LoadedTranslator.load(checkpoint, "cpu", precision)
               for name, precision in (("scriven", "fp32"), ("scriven_int8", "int8"))}
    for quantization in ("float32", "int8"):
        path = export(checkpoint, "ctranslate2", folder / f"ct2-{quantization}", quantization)
        engines[f"ct2_{quantization}"] = runtimes.load_translator(path, "cpu", threads)
    out: dict = {}
    for name, engine in engines.items():
        translate(engine, sentences[:16], beam=4)  # warm-up
        row = {}
        for label, beam in (("greedy", 1), ("beam4", 4)):
            seconds, hyps = timed(lambda e=engine, b=beam: translate(e, sentences, beam=b,
                                                                     batch_size=64))
            row[label] = {"sentences_per_s": round(len(sentences) / seconds, 1),
                          "bleu": round(sacrebleu.corpus_bleu(hyps, [references]).score, 2)}
        out[name] = row
        log(f"[translator] {name}: {row}")
    base = out["scriven"]["beam4"]
    for name in ("scriven_int8", "ct2_float32", "ct2_int8"):
        out[name]["beam4"]["speedup_vs_scriven"] = round(
            out[name]["beam4"]["sentences_per_s"] / base["sentences_per_s"], 2)
        out[name]["beam4"]["bleu_minus_scriven"] = round(out[name]["beam4"]["bleu"] - base["bleu"], 2)
    return out


def tokens_per_second(decoder, prompt_ids: list[int], streams: int, tokens: int) -> float:
    batch = torch.tensor([prompt_ids] * streams)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in sample_ids(decoder, batch, tokens, temperature=1.0, generator=generator):
        pass
    return streams * tokens / (time.perf_counter() - start)


def step_tokens_per_second(decoder, prompt_ids: list[int], streams: int, tokens: int) -> float:
    """The runtime's own ceiling: steps back to back, each feeding the prompt's last token
    again, with no sampling and no other work between them."""
    batch = torch.tensor([prompt_ids] * streams)
    _, state = decoder.read(batch)
    ids = batch[:, -1]
    start = time.perf_counter()
    for _ in range(tokens):
        _, state = decoder.step(ids, state)
    return streams * tokens / (time.perf_counter() - start)


def sampler_figures(vocab: int, repeats: int = 300) -> dict:
    """µs per draw at temperature 1 from `vocab` logits, one row and 64, through
    `sampling.sample_shared`: on the native kernel where it runs (`accel.sample_plain`), and on
    PyTorch alone, alternating, in this run."""
    from scriven import accel
    from scriven.accel import native
    from scriven.sampling import sample_shared

    g = torch.Generator().manual_seed(0)
    logits, u = torch.randn(64, vocab, generator=g) * 3, torch.rand(64, generator=g)
    kernel = accel.sample_plain

    def micros(rows: int, use_kernel: bool) -> float:
        accel.sample_plain = kernel if use_kernel else (lambda *a: None)
        x, r = logits[:rows].contiguous(), u[:rows].contiguous()
        try:
            for _ in range(10):
                sample_shared(x, 1.0, None, None, r)
            start = time.perf_counter()
            for _ in range(repeats):
                sample_shared(x, 1.0, None, None, r)
            return (time.perf_counter() - start) / repeats * 1e6
        finally:
            accel.sample_plain = kernel

    lib = native.generation_library()
    out: dict = {"kernels": lib.build if lib is not None else None}
    for rows in (1, 64):
        best = {"native": [], "pytorch": []}
        for _ in range(3):
            for name in best:
                best[name].append(micros(rows, name == "native"))
        row = {name: round(min(times), 1) for name, times in best.items()}
        row["speedup"] = round(row["pytorch"] / row["native"], 2) if lib is not None else None
        out[f"rows_{rows}_us"] = row
    return out


def lm_figures(checkpoint: Path, text: str, folder: Path, streams: int, tokens: int,
               threads: int) -> dict:
    decoders = {name: LoadedLM.load(checkpoint, "cpu", precision).decoder
                for name, precision in (("scriven_fp32", "fp32"), ("scriven_int8", "int8"))}
    tokenizer = LoadedLM.load(checkpoint, "cpu").tokenizer
    for quantization in ("float32", "int8"):
        path = export(checkpoint, "onnx", folder / f"onnx-{quantization}", quantization)
        decoders[f"onnx_{quantization}"] = runtimes.load_lm(path, threads)[0]
    prompt = encode_prompt(tokenizer, "she said that")
    # the checkpoint's validation text: train_lm's split of the text it trained on
    valid_text = _cut_text(read_text(resolve_text_source(text)), 0.05, 0.05)[1]
    valid = torch.tensor(tokenizer.encode(valid_text))
    out: dict = {}
    for name, decoder in decoders.items():
        tokens_per_second(decoder, prompt, 1, 10)  # warm-up
        out[name] = {"single_stream_tok_s": round(tokens_per_second(decoder, prompt, 1, tokens)),
                     f"{streams}_streams_tok_s": round(tokens_per_second(decoder, prompt, streams,
                                                                         tokens)),
                     "steps_only_single_stream_tok_s": round(
                         step_tokens_per_second(decoder, prompt, 1, tokens)),
                     f"steps_only_{streams}_streams_tok_s": round(
                         step_tokens_per_second(decoder, prompt, streams, tokens)),
                     "valid_ppl": round(stepper_perplexity(decoder, valid, 64), 3)}
        log(f"[lm] {name}: {out[name]}")
    fp32 = out["scriven_fp32"]["valid_ppl"]
    for row in out.values():
        row["ppl_vs_scriven_fp32_percent"] = round(100 * (row["valid_ppl"] / fp32 - 1), 3)
    out["sampler"] = sampler_figures(tokenizer.vocab_size)
    log(f"[lm] sampler: {out['sampler']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--translator", help="a translator checkpoint (default: train one here)")
    ap.add_argument("--lm", help="an LSTM checkpoint (default: train one here)")
    ap.add_argument("--text", default="anna",
                    help="the text the LSTM trained on (its validation split is scored)")
    ap.add_argument("--pairs", default="eng-fra",
                    help="pair file or dataset: trains the translator (when not given) and its "
                    "test split is translated")
    ap.add_argument("--parts", default="translator,lm", help="translator, lm or both")
    ap.add_argument("--minutes", type=float, default=1.5, help="translator training budget")
    ap.add_argument("--lm-minutes", type=float, default=0.5, help="LSTM training budget")
    ap.add_argument("--sentences", type=int, default=200, help="held-out sentences translated")
    ap.add_argument("--tokens", type=int, default=200, help="tokens generated per stream")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="threads for PyTorch, ONNX Runtime and CTranslate2 alike")
    ap.add_argument("--out", help="where to keep models and exports (default: a temp dir)")
    add_profile_argument(ap)
    args = ap.parse_args()
    enter_profile(args)
    torch.set_num_threads(args.threads)
    folder = Path(args.out or tempfile.mkdtemp(prefix="scriven-bench-export-"))
    folder.mkdir(parents=True, exist_ok=True)
    info = machine_info(args.profile, peaks=False)

    parts = set(args.parts.split(","))
    translator = Path(args.translator) if args.translator else None
    if translator is None and "translator" in parts:
        log(f"[train] translator, default preset, {args.minutes} min")
        train_translate(args.pairs, folder / "translator", preset="default", minutes=args.minutes,
                        eval_every=10**9, bleu_sentences=50, progress=False)
        translator = folder / "translator" / "latest"
    lm = Path(args.lm) if args.lm else None
    if lm is None and "lm" in parts:
        log(f"[train] LSTM, default preset, {args.lm_minutes} min")
        train_lm(args.text, folder / "lm", preset="default", minutes=args.lm_minutes,
                 eval_every=10**9, progress=False)
        lm = folder / "lm" / "latest"

    test = []
    if translator is not None:
        data = load_pairs(args.pairs)
        test = random.Random(1).sample(data.test, min(args.sentences, len(data.test)))
    summary = {
        "bench": "export",
        "machine": info,
        "settings": {"translator": str(translator), "lm": str(lm), "pairs": args.pairs,
                     "sentences": len(test),
                     "batch_size": 64, "length_penalty": 1.0, "tokens": args.tokens,
                     "streams": args.streams, "threads": args.threads, "translator_minutes": None if args.translator
                     or "translator" not in parts else args.minutes,
                     "lm_minutes": None if args.lm or "lm" not in parts else args.lm_minutes},
    }
    targets = {}
    if translator is not None:
        summary["translator"] = translator_figures(translator, folder, [p.source for p in test],
                                                   [p.target for p in test], args.threads)
        t = summary["translator"]["ct2_int8"]["beam4"]
        targets["ct2_int8_beam4_3x_scriven"] = t["speedup_vs_scriven"] >= 3.0
        targets["ct2_int8_beam4_bleu_within_0.3"] = abs(t["bleu_minus_scriven"]) <= 0.3
    if lm is not None:
        summary["lm"] = lm_figures(lm, args.text, folder, args.streams, args.tokens,
                                   args.threads)
        onnx = [r for r in (summary["lm"]["onnx_float32"], summary["lm"]["onnx_int8"])
                if abs(r["ppl_vs_scriven_fp32_percent"]) <= 1.0]
        targets["onnx_5000_tok_s_single_stream_ppl_within_1pct"] = max(
            (r["single_stream_tok_s"] for r in onnx), default=0) >= 5000
        targets["onnx_50000_tok_s_64_streams_ppl_within_1pct"] = args.streams == 64 and max(
            (r[f"{args.streams}_streams_tok_s"] for r in onnx), default=0) >= 50000
    summary["targets"] = targets
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
