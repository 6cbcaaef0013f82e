"""The best model for your minutes: scriven's default against a peer's published recipe, each
given the same number of minutes on this machine. Prints one JSON summary.

The character-level arms train on Anna Karenina, on scriven's own split (90/5/5 by position)
and data pipeline (contiguous streams), scored by validation bits per character with windows of
their trained context:

  gpt_*, lstm_*: what `scriven train lm anna --model M --tokenizer char --preset P --minutes N`
      trains (the preset, its training window, learning rate and budget-planned schedule);
  reference: nanoGPT's README recipe for a CPU (Shakespeare, character level), written here as a
      scriven config from its published numbers: 4 layers, 4 heads, 128 wide, block 64, batch
      12, dropout 0, 2,000 iterations, lr 1e-3 with 100 warmup steps and cosine decay to 1e-4,
      AdamW betas (0.9, 0.99), weight decay 0.1, gradient clip 1. Its 2,000 iterations are a
      step budget for a slower machine: here the recipe gets the same minutes as every arm, its
      cosine decay planned over the steps they hold (on the 2-core Xeon, 2,000 steps took 1.5
      of 3 minutes), so it never stops early or is cut off mid-decay.

Arms: gpt_default, lstm_default (the fixed default presets), gpt_auto, lstm_auto
(`--preset auto`), reference; gpt_auto_adamw, gpt_auto_muon, lstm_auto_adamw, lstm_auto_muon
(`auto` with the optimizer named); gpt_auto_alibi, gpt_auto_learned (`auto` with the position
scheme named); word_lstm, word_gpt (what `--minutes` trains by default on
words, scored by validation perplexity), word_lstm_default, word_lstm_auto; and for the
translator (`--arms translate_default,translate_joeynmt`, eng-fra, test BLEU and chrF with beam
4 on the held-out split) scriven's default beside
JoeyNMT's recipe (below); translate_adamw and translate_muon name the optimizer.

    SCRIVEN_DATA_MIRROR=../shared/data python bench/budget.py --minutes 10
    SCRIVEN_DATA_MIRROR=../shared/data python bench/budget.py --quick            # a smoke run
    SCRIVEN_DATA_MIRROR=../shared/data python bench/budget.py --profile portable # AVX2 laptop
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from machine import add_profile_argument, enter_profile, machine_info

from scriven.data import fetch, read_text
from scriven.lm import LMTask, LMTrainConfig, _cut_text, train_lm
from scriven.models.gpt import GPT, GPTConfig
from scriven.tokenizers import CharTokenizer
from scriven.train import CheckpointSpec, TrainResult, fit
from scriven.translation import evaluate_translation, train_translate

# nanoGPT's README, "I only have a macbook" (CPU): config/train_shakespeare_char.py with
# --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
# --lr_decay_iters=2000 --dropout=0.0; from that config file: learning_rate 1e-3, min_lr 1e-4,
# warmup_iters 100, beta2 0.99; from train.py's defaults: weight_decay 0.1, grad_clip 1.0; and
# fp32, as its train.py runs on a CPU (autocast only on CUDA).
REFERENCE_MODEL = dict(d_model=128, n_heads=4, n_layers=4, d_ff=4 * 128, dropout=0.0, max_len=64)
REFERENCE_TRAIN = dict(batch_size=12, seq_len=64, lr=1e-3, warmup_steps=100,
                       schedule="cosine", min_lr_ratio=0.1, betas=(0.9, 0.99), weight_decay=0.1,
                       grad_clip=1.0, amp="off")


def curve(run: Path, metric: str = "bits_per_char") -> list[tuple[float, float]]:
    """(training minutes, validation `metric`) at each validation of a run."""
    points = []
    for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if f"val_{metric}" in record:
            points.append((round(record["elapsed"] / 60, 3), round(record[f"val_{metric}"], 4)))
    return points


def arm(result: TrainResult, run: Path, config: dict, metric: str = "bits_per_char") -> dict:
    points = curve(run, metric)
    return {"steps": result.steps, "planned_steps": result.planned_steps,
            "minutes": round(result.elapsed / 60, 2),
            "tokens_per_s": round(result.tokens_per_second),
            f"final_{metric}": round(result.metrics[metric], 4),
            f"best_{metric}": min(b for _, b in points), "curve": points, "config": config}


def scriven_arm(model: str, preset: str | None, tokenizer: str = "char", **settings):
    """What `scriven train lm anna --model MODEL --tokenizer TOKENIZER --preset PRESET --minutes
    M` trains, with everything else at its defaults (or `settings`; preset None: the default
    for a time budget, `lm.default_preset`). Words are scored by perplexity."""
    def run_arm(minutes: float, workdir: Path) -> dict:
        run = workdir / "_".join([tokenizer, model, str(preset), *map(str, settings.values())])
        result = train_lm("anna", run, preset=preset, model=model, tokenizer=tokenizer,
                          minutes=minutes, progress=False, **settings)
        saved = json.loads((run / "latest" / "config.json").read_text(encoding="utf-8"))
        return arm(result, run, {key: saved[key] for key in ("model", "train", "sizing")
                                 if key in saved},
                   "perplexity" if tokenizer == "word" else "bits_per_char")
    return run_arm


def reference(minutes: float, workdir: Path) -> dict:
    """The peer's recipe through scriven's own trainer, on the same split as `train_lm`."""
    run = workdir / "reference"
    train_text, valid_text, _ = _cut_text(read_text(fetch("anna")), 0.05, 0.05)
    tok = CharTokenizer.train([train_text])
    train_ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
    valid_ids = torch.tensor(tok.encode(valid_text), dtype=torch.long)
    model_config = GPTConfig(vocab_size=tok.vocab_size, **REFERENCE_MODEL)
    config = LMTrainConfig(minutes=minutes, **REFERENCE_TRAIN)
    torch.manual_seed(config.seed)
    model = GPT(model_config)
    task = LMTask(train_ids, valid_ids, 1.0, config.batch_size, config.seq_len,
                  torch.device("cpu"), carries_state=False)
    spec = CheckpointSpec("gpt", asdict(model_config), tok.to_json_str(), {"bench": "reference"})
    result = fit(model, task, config, run, spec, progress_bar=False)
    return arm(result, run, {"model": asdict(model_config), "train": asdict(config)})


# JoeyNMT's Transformer recipe for small data (configs/transformer_*.yaml, "Joey NMT" docs):
# 3+3 pre-norm layers, d_model 256, 4 heads, feed-forward 1,024, dropout 0.1, tied embeddings,
# label smoothing 0.1, batches of 2,048 tokens, Adam betas (0.9, 0.98), lr 1e-3 with 500 warmup
# steps then inverse-square-root decay. scriven's default preset has the same sizes, so only the
# training recipe differs.
JOEYNMT_TRAIN = dict(max_tokens=2048, lr=1e-3, warmup_steps=500, schedule="inverse_sqrt",
                     label_smoothing=0.1, dropout=0.1)


def translator_arm(name: str, **recipe):
    def run_arm(minutes: float, workdir: Path) -> dict:
        run = workdir / name
        result = train_translate("eng-fra", run, minutes=minutes, progress=False, **recipe)
        scores = evaluate_translation(run / "best", "eng-fra", beam=4, split="test")
        saved = json.loads((run / "latest" / "config.json").read_text(encoding="utf-8"))
        return {"steps": result.steps, "minutes": round(result.elapsed / 60, 2),
                "target_tokens_per_s": round(result.tokens_per_second),
                "valid_bleu_greedy": round(result.best, 2) if result.best is not None else None,
                "test_bleu_beam4": round(scores["bleu"], 2),
                "test_chrf_beam4": round(scores["chrf"], 2), "test_pairs": scores.get("pairs"),
                "config": {key: saved[key] for key in ("model", "train", "sizing") if key in saved}}
    return run_arm


ARMS = {
    "gpt_default": scriven_arm("gpt", "default"),
    "gpt_auto": scriven_arm("gpt", "auto"),
    "gpt_auto_alibi": scriven_arm("gpt", "auto", positions="alibi"),
    "gpt_auto_learned": scriven_arm("gpt", "auto", positions="learned"),
    "lstm_default": scriven_arm("lstm", "default"),
    "lstm_auto": scriven_arm("lstm", "auto"),
    "gpt_auto_adamw": scriven_arm("gpt", "auto", optimizer="adamw"),
    "gpt_auto_muon": scriven_arm("gpt", "auto", optimizer="muon"),
    "lstm_auto_adamw": scriven_arm("lstm", "auto", optimizer="adamw"),
    "lstm_auto_muon": scriven_arm("lstm", "auto", optimizer="muon"),
    "reference": reference,
    "word_lstm": scriven_arm("lstm", None, "word"),
    "word_lstm_default": scriven_arm("lstm", "default", "word"),
    "word_lstm_auto": scriven_arm("lstm", "auto", "word"),
    "word_gpt": scriven_arm("gpt", None, "word"),
    "translate_default": translator_arm("translate_default"),
    "translate_joeynmt": translator_arm("translate_joeynmt", **JOEYNMT_TRAIN),
    "translate_adamw": translator_arm("translate_adamw", optimizer="adamw"),
    "translate_muon": translator_arm("translate_muon", optimizer="muon"),
}


def compare(arms: dict) -> dict:
    """Each scriven arm against its reference: bits/char (negative: scriven lower) and BLEU."""
    out = {}
    ref = arms.get("reference")
    for name, a in arms.items():
        if ref and "final_bits_per_char" in a and name != "reference":
            diff = a["final_bits_per_char"] - ref["final_bits_per_char"]
            out[f"{name}_vs_nanogpt_recipe"] = {
                "bits_per_char": round(diff, 4),
                "percent": round(100 * diff / ref["final_bits_per_char"], 1),
                "target_5_percent_fewer": diff <= -0.05 * ref["final_bits_per_char"]}
    word_lstm = arms.get("word_lstm") or arms.get("word_lstm_default")
    if word_lstm and arms.get("word_gpt"):
        gpt = arms["word_gpt"]
        out["word_gpt_vs_word_lstm"] = {
            "perplexity": round(gpt["final_perplexity"] - word_lstm["final_perplexity"], 2),
            "target_gpt_below_lstm": gpt["final_perplexity"] < word_lstm["final_perplexity"]}
    for name in ("word_lstm", "word_lstm_default", "word_lstm_auto"):
        if name in arms:
            out[f"{name}_perplexity_le_100"] = arms[name]["final_perplexity"] <= 100
    joey, ours = arms.get("translate_joeynmt"), arms.get("translate_default")
    if joey and ours:
        out["translate_default_vs_joeynmt_recipe"] = {
            "test_bleu_beam4": round(ours["test_bleu_beam4"] - joey["test_bleu_beam4"], 2),
            "target_3_bleu_above": ours["test_bleu_beam4"] - joey["test_bleu_beam4"] >= 3,
            "target_test_bleu_32": ours["test_bleu_beam4"] >= 32}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="each arm's training budget")
    ap.add_argument("--quick", action="store_true", help="half a minute each: a smoke run")
    ap.add_argument("--out", default=None, help="where to keep the runs (default: a temp dir)")
    ap.add_argument("--arms", default="gpt_default,gpt_auto,lstm_default,lstm_auto,reference",
                    help=f"which arms to run, in order: {', '.join(ARMS)}")
    add_profile_argument(ap)
    args = ap.parse_args()
    enter_profile(args)
    minutes = 0.5 if args.quick else args.minutes
    workdir = Path(args.out or tempfile.mkdtemp(prefix="scriven-budget-"))
    summary: dict = {"bench": "budget", "minutes": minutes,
                     "machine": machine_info(args.profile, peaks=not args.quick),
                     "data": {"text": "anna", "tokenizer": "char",
                              "split": "position 90/5/5 (train, valid, test)"}, "arms": {}}
    for name in args.arms.split(","):
        if name not in ARMS:
            ap.error(f"unknown arm {name!r}: one of {', '.join(ARMS)}")
    for name in args.arms.split(","):
        print(f"[{name}] {minutes:g} minutes ...", file=sys.stderr, flush=True)
        summary["arms"][name] = ARMS[name](minutes, workdir)
        print(json.dumps({name: summary["arms"][name]}), file=sys.stderr, flush=True)
    summary["comparisons"] = compare(summary["arms"])
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
