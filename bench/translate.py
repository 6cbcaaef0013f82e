"""Benchmark for the English→French Transformer translator on eng-fra. Prints one JSON summary.

All figures come from one run on one machine, so ratios between them are meaningful:
  quality: BLEU and chrF (sacrebleu, cased, 13a) on the held-out test split of scriven's own
      split of eng-fra (by source sentence, 90/5/5) after `--minutes` of training the default
      preset: greedy, beam 4, and the beam size and length penalty that score best on the
      validation split (a small grid, so the test split is never used for choosing);
  training speed: target tokens/s, and model FLOP/s (matmul FLOPs counted exactly from the
      training sentences' lengths, 3 × forward) over the bf16 matmul peak: the best of the
      probes in this run, before, during (at each validation) and after training (this VM's
      matmul speed changes by up to 2x from minute to minute, so the highest probe is the
      conservative denominator; each stretch between validations is also given against the
      probe taken at its end);
  translation speed: sentences/s on test sentences for batched greedy search (KV cache), beam 4,
      and the book's decoding (one sentence at a time, the whole prefix recomputed each step)
      on the same model.

    SCRIVEN_DATA_MIRROR=../shared/data python bench/translate.py            # 60 minutes of training
    SCRIVEN_DATA_MIRROR=../shared/data python bench/translate.py --quick    # a 2-minute smoke run
    # on a GPU (training, peak probes of 8192³ there, and decoding):
    SCRIVEN_DATA_MIRROR=../shared/data python bench/translate.py --quick --device cuda
    # evaluate an earlier run again (its training figures taken from its JSON summary):
    python bench/translate.py --trained OUT/run --training-summary OUT.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine import add_profile_argument, enter_profile, machine_info, matmul_peak
from plain_transformer import speed_vs_plain

from scriven import checkpoint as ckpt_io
from scriven.device import autocast_dtype, resolve_device, training_precision
from scriven.tokenizers import BOS_ID, EOS_ID
from scriven.translation import (
    TranslationTask,
    encode_pairs,
    evaluate_translation,
    load_pairs,
    train_translate,
)
from scriven.translator import LoadedTranslator, default_max_len, translate

# Beam sizes and GNMT length-penalty exponents tried on the validation split.
DECODING_GRID = [(beam, alpha) for beam in (4, 8) for alpha in (0.6, 1.0, 1.4, 2.0)]


PROBES_AROUND_TRAINING = 3  # peak probes before training and again after it


def step_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The MFU's peak probe, in the dtype training multiplies in: 4096³ on a CPU (2048³ in fp32,
    which reaches its peak sooner); 8192³ on a GPU, which 4096³ leaves part idle."""
    n = 8192 if device.type == "cuda" else (4096 if dtype == torch.bfloat16 else 2048)
    return matmul_peak(dtype, n=n, device=device)


def probe_at_validations(probes: list[float], device: torch.device, dtype: torch.dtype) -> None:
    """Also probe the peak at every validation (validation time is not step time), so that the
    probes span the whole run, not only its two ends."""
    evaluate = TranslationTask.evaluate

    def probing(self, model):
        probes.append(step_peak(device, dtype))
        return evaluate(self, model)

    TranslationTask.evaluate = probing  # type: ignore[method-assign]


def forward_flops(cfg, s: int, t: int) -> int:
    """Matmul FLOPs of one teacher-forced forward pass: source of s tokens, decoder input of t
    (<bos> + target). 2 FLOPs per multiply-add; attention scores and weighted sums counted in
    full (causal masking not subtracted); embeddings lookups, norms, softmax not counted."""
    d, f, v = cfg.d_model, cfg.d_ff, cfg.tgt_vocab_size
    enc = cfg.encoder_layers * (8 * s * d * d + 4 * s * d * f + 4 * s * s * d)
    dec = cfg.decoder_layers * (8 * t * d * d + 4 * t * t * d        # self-attention
                                + 4 * t * d * d + 4 * s * d * d      # cross: q, o on t; k, v on s
                                + 4 * t * s * d                      # cross scores and sums
                                + 4 * t * d * f)                     # feed-forward
    return enc + dec + 2 * t * d * v                                 # output projection


def flops_per_target_token(tr: LoadedTranslator, examples) -> float:
    """Training FLOPs (3 × forward) per target token the trainer counts (target + <eos>)."""
    cfg = tr.model.config
    total = sum(3 * forward_flops(cfg, len(src), len(tgt) - 1) for src, tgt in examples)
    tokens = sum(len(tgt) - 1 for _, tgt in examples)
    return total / tokens


def mfu_by_stretch(history: list[dict], probes: list[float], per_token: float) -> list[dict]:
    """MFU of each stretch between validations against the probe taken at its closing validation
    (probes: PROBES_AROUND_TRAINING before training, one per validation, then those after): this VM's matmul peak
    moves between states during a run, and this shows the ratio within each. Tokens/s of a
    stretch: harmonic mean of its logged rates (each over the same number of steps)."""
    validations = [r["step"] for r in history if "val_bleu" in r]
    stretches, start = [], 0
    for i, end in enumerate(validations):
        rates = [r["tokens_per_s"] for r in history
                 if "tokens_per_s" in r and start < r["step"] <= end]
        at = PROBES_AROUND_TRAINING + i
        if rates and at < len(probes):
            tps = len(rates) / sum(1 / x for x in rates)
            stretches.append({"steps": [start, end], "target_tokens_per_s": round(tps),
                              "probe_gflops_per_s": round(probes[at] / 1e9),
                              "mfu": round(tps * per_token / probes[at], 3)})
        start = end
    return stretches


def rate(fn, count: int) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return count / (time.perf_counter() - t), out


def book_decoding(tr: LoadedTranslator, sources: list[str]) -> tuple[float, list[str]]:
    """The book's loop: one sentence at a time, every step re-running the decoder on the whole
    prefix. Same limit per sentence as scriven's default."""
    from recompute import recompute_greedy  # bench/recompute.py, next to this script

    from scriven.translator import translation_text
    ids, _ = tr.encode_sources(sources)
    t = time.perf_counter()
    outs = [recompute_greedy(tr.model, torch.tensor(x, device=tr.device), BOS_ID, EOS_ID,
                             default_max_len(tr.model, len(x))) for x in ids]
    seconds = time.perf_counter() - t
    return len(sources) / seconds, [translation_text(tr.tokenizer, o) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=None,
                    help="training budget (step time): 60, or 0.75 with --quick")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: short training unless --minutes, small evaluation")
    ap.add_argument("--preset", default="default", help="the model's preset (gpu: sized for a GPU)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="padded tokens per batch (default: the preset's recipe)")
    ap.add_argument("--lr", type=float, default=None, help="default: the preset's recipe")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="default: scriven's planned fraction of the run")
    ap.add_argument("--dropout", type=float, default=None,
                    help="default: scriven's, which follows the passes the budget holds")
    ap.add_argument("--eval-every", type=int, default=None,
                    help="default: scriven's planned validations")
    ap.add_argument("--speed-sentences", type=int, default=500)
    ap.add_argument("--book-sentences", type=int, default=200)
    ap.add_argument("--device", default="cpu",
                    help="cpu, or cuda[:N] to train, probe the peak and decode on a GPU")
    ap.add_argument("--out", default=None, help="where to keep the run (default: a temp dir)")
    ap.add_argument("--trained", default=None,
                    help="skip training: evaluate this run folder (an earlier --out's run/)")
    ap.add_argument("--training-summary", default=None,
                    help="with --trained: that run's JSON summary, for its training figures")
    ap.add_argument("--baseline-batches", type=int, default=12,
                    help="batches timed against a plain nn.Transformer (0: skip)")
    add_profile_argument(ap)
    args = ap.parse_args()
    enter_profile(args)
    if args.trained and not args.training_summary:
        ap.error("--trained needs --training-summary (the training figures come from that run)")
    test_limit = None
    if args.quick:
        args.minutes = args.minutes or 0.75
        args.eval_every = args.eval_every or 10_000
        args.speed_sentences, args.book_sentences, test_limit = 200, 30, 300
        args.baseline_batches = min(args.baseline_batches, 6)
    args.minutes = args.minutes or 60.0
    torch.manual_seed(0)
    random.seed(0)
    warnings.simplefilter("default")
    out = Path(args.trained) if args.trained else \
        Path(args.out or tempfile.mkdtemp(prefix="scriven-bench-translate-")) / "run"
    device = resolve_device(args.device)
    precision = training_precision("auto", device, pure_bf16=True)

    # The MFU's denominator: the peak of the dtype training multiplies in, measured in this run.
    step_dtype = (torch.bfloat16 if precision == "bf16-pure"
                  or autocast_dtype(precision, device) == torch.bfloat16 else torch.float32)
    probes: list[float] = []
    if not args.trained:  # the MFU's peak is measured in the training run itself
        probes += [step_peak(device, step_dtype) for _ in range(PROBES_AROUND_TRAINING)]
        peak_fp32 = matmul_peak(torch.float32, n=2048, device=device)
        print(f"matmul peak: {step_dtype} {max(probes) / 1e9:.0f} GFLOP/s, fp32 {peak_fp32 / 1e9:.0f} "
              "GFLOP/s", file=sys.stderr, flush=True)

    if args.trained:
        earlier = json.loads(Path(args.training_summary).read_text())
        training, settings = earlier["training"], earlier["settings"]
    else:
        probe_at_validations(probes, device, step_dtype)
        t0 = time.perf_counter()
        result = train_translate("eng-fra", out, preset=args.preset, vocab_size=8000,
                                 minutes=args.minutes, max_tokens=args.max_tokens, lr=args.lr,
                                 warmup_steps=args.warmup_steps, label_smoothing=0.1,
                                 dropout=args.dropout, eval_every=args.eval_every, patience=0,
                                 bleu_sentences=500 if not args.quick else 100, amp="auto",
                                 device=str(device), seed=0, progress=False)
        wall_train = time.perf_counter() - t0
        print(f"[train] {result.steps} steps, {result.epochs_done:.2f} epochs, "
              f"{result.elapsed / 60:.1f} min of steps, {result.tokens_per_second:,.0f} tok/s, "
              f"{result.metrics}", file=sys.stderr, flush=True)
        tokens_per_second = result.tokens_per_second
        probes += [step_peak(device, step_dtype) for _ in range(PROBES_AROUND_TRAINING)]
        print(f"matmul peak probes: {[round(p / 1e9) for p in probes]} GFLOP/s", file=sys.stderr,
              flush=True)

    tr = LoadedTranslator.load(out, str(device))  # best/: the highest validation BLEU
    saved = ckpt_io.load(out / "best")
    recipe = saved.config["train"]  # what the run trained with, defaults resolved
    data = load_pairs("eng-fra")
    examples, _ = encode_pairs(tr.tokenizer, data.train, tr.max_len)
    src_tokens = sum(len(s) for s, _ in examples)
    tgt_tokens = sum(len(t) - 1 for _, t in examples)

    # Decoding settings are chosen on the validation split; the test split is scored once each.
    sweep = []
    for beam, alpha in DECODING_GRID if not args.quick else [(4, 1.0)]:
        r = evaluate_translation(tr, "eng-fra", beam=beam, length_penalty=alpha,
                                 limit=test_limit, split="valid")
        sweep.append({"beam": beam, "length_penalty": alpha, "valid_bleu": r["bleu"],
                      "valid_chrf": r["chrf"]})
        print(f"[valid] {sweep[-1]}", file=sys.stderr, flush=True)
    chosen = max(sweep, key=lambda r: (r["valid_bleu"], -r["beam"]))
    greedy_eval = evaluate_translation(tr, "eng-fra", beam=1, limit=test_limit)
    beam_eval = evaluate_translation(tr, "eng-fra", beam=4, limit=test_limit)
    chosen_eval = evaluate_translation(tr, "eng-fra", beam=chosen["beam"], limit=test_limit,
                                       length_penalty=chosen["length_penalty"])
    print(f"[test] greedy {greedy_eval['bleu']} BLEU, beam 4 {beam_eval['bleu']} BLEU, "
          f"chosen on valid {chosen_eval['bleu']} BLEU", file=sys.stderr, flush=True)

    rng = random.Random(1)
    sentences = [p.source for p in rng.sample(data.test, min(args.speed_sentences, len(data.test)))]
    translate(tr, sentences[:16])  # warm-up
    greedy_rate, greedy_out = rate(lambda: translate(tr, sentences, batch_size=64), len(sentences))
    beam_rate, _ = rate(lambda: translate(tr, sentences, beam=4, batch_size=64), len(sentences))
    book = sentences[: args.book_sentences]
    book_rate, book_out = book_decoding(tr, book)
    agree = sum(a == b for a, b in zip(book_out, greedy_out)) / max(len(book), 1)

    baseline = None
    if args.baseline_batches:
        from scriven.pairs import token_batches

        every = token_batches(examples, recipe["max_tokens"], shuffle=True, seed=0)
        picked = every[:: max(1, len(every) // args.baseline_batches)][: args.baseline_batches]
        baseline = speed_vs_plain(tr.model.config, picked, precision, device)
        per = flops_per_target_token(tr, examples)
        for who in ("scriven", "plain"):
            baseline[f"{who}_model_gflops_per_s"] = round(
                per * baseline[f"{who}_target_tokens_per_s"] / 1e9, 1)
        print(f"[baseline] {baseline}", file=sys.stderr, flush=True)

    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(round(r["elapsed"] / 60, 2), round(r["val_bleu"], 2)) for r in history
             if "val_bleu" in r]
    cfg = tr.model.config
    if not args.trained:
        settings = {"preset": args.preset, "parameters": tr.model.num_parameters(),
                    "d_model": cfg.d_model, "layers": [cfg.encoder_layers, cfg.decoder_layers],
                    "dropout": cfg.dropout, "max_tokens": recipe["max_tokens"], "lr": recipe["lr"],
                    "warmup_steps": args.warmup_steps or "5% of the planned steps",
                    "schedule": "cosine to 5% over the planned steps",
                    "label_smoothing": 0.1, "betas": [0.9, 0.98], "minutes_budget": args.minutes}
        training = {"steps": result.steps, "epochs": round(result.epochs_done, 3),
                    "step_minutes": round(result.elapsed / 60, 2),
                    "wall_minutes": round(wall_train / 60, 2),
                    "target_tokens_per_s": round(result.tokens_per_second),
                    "final_validation": {k: round(v, 3) for k, v in result.metrics.items()},
                    "best_validation_bleu": round(result.best or 0.0, 2),
                    "validation_bleu_curve_minutes": curve}
        per_token = flops_per_target_token(tr, examples)
        flops = per_token * tokens_per_second
        peak = max(probes)
        training.update({
            "flops_per_target_token": round(per_token),
            "model_gflops_per_s": round(flops / 1e9, 1),
            "matmul_dtype": str(step_dtype).replace("torch.", ""),
            "matmul_peak_gflops_per_s": round(peak / 1e9, 1),
            "matmul_peak_probes": [round(p / 1e9) for p in probes],
            "fp32_matmul_peak_gflops_per_s": round(peak_fp32 / 1e9, 1),
            "mfu": round(flops / peak, 4),
            "mfu_of_fp32_peak": round(flops / peak_fp32, 4),
            "mfu_by_stretch": mfu_by_stretch(history, probes, per_token)})
    summary = {
        "bench": "translate",
        "quick": args.quick,
        "machine": {**machine_info(args.profile, str(device)), "precision": precision},
        "data": {**saved.config["data"]["pairs"], "vocab": tr.tokenizer.vocab_size,
                 "train_source_tokens": src_tokens, "train_target_tokens": tgt_tokens,
                 "split": "by source sentence, 90/5/5, seed 0",
                 "attribution": saved.config["data"].get("attribution")},
        "settings": settings,
        "evaluated_separately": bool(args.trained),
        "training": training,
        "training_speed_vs_plain_nn_transformer": baseline,
        "decoding_chosen_on_valid": {"grid": sweep, "chosen": chosen},
        "test": {"greedy": greedy_eval, "beam4": beam_eval, "chosen_on_valid": chosen_eval},
        "translation_sentences_per_s": {
            "sentences": len(sentences),
            "greedy_batched": round(greedy_rate, 1),
            "beam4_batched": round(beam_rate, 1),
            "book_recompute_one_at_a_time": round(book_rate, 1),
            "book_sentences": len(book),
            "book_equals_greedy_fraction": round(agree, 3),
        },
        "targets": {
            "bleu_ge_40": max(e["bleu"] for e in (greedy_eval, beam_eval, chosen_eval)) >= 40,
            "mfu_ge_25pct": training["mfu"] >= 0.25,
            "greedy_ge_200_sentences_per_s": greedy_rate >= 200,
            "beam4_ge_40_sentences_per_s": beam_rate >= 40,
            "beam4_ge_100_sentences_per_s": beam_rate >= 100,
            "training_ge_1.5x_plain": bool(baseline) and baseline["ratio"] >= 1.5,
        },
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
