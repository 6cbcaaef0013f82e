"""Benchmark for the word-level text generator on Anna Karenina. Prints one JSON summary.

All figures come from one run on one machine, so ratios between them are meaningful:
  quality per CPU time: validation perplexity versus training minutes for (a) the book's method
      reproduced faithfully and (b) scriven's default, on the same split and vocabulary;
  generation speed: single stream at 100 and 2,000 new tokens, scriven (prompt read once, state
      carried) versus the book's re-feed loop on the same model; 64 streams batched;
  training throughput in tokens/s.

    SCRIVEN_DATA_MIRROR=../shared/data python bench/lm.py            # 15 + 30 minutes of training
    SCRIVEN_DATA_MIRROR=../shared/data python bench/lm.py --quick    # a 2-minute smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from machine import add_profile_argument, enter_profile, machine_info

from scriven import checkpoint as ckpt_io
from scriven.data import fetch, read_text
from scriven.generation import sample_ids
from scriven.lm import LMTask, LMTrainConfig, chars_per_token, lm_metrics, stream_nll
from scriven.models.gpt import GPT, GPTConfig
from scriven.models.lstm import LSTMConfig, LSTMLanguageModel
from scriven.precision import PRECISIONS
from scriven.stepper import LSTMStepper
from scriven.tokenizers import WordTokenizer, split_words
from scriven.train import CheckpointSpec, fit

PROMPT = "anna and the prince"


def seed_split(text: str):
    """The book's tokenization, split by token position 90/5/5, vocabulary from train only."""
    words = split_words(text, lowercase=True)
    n = len(words)
    a, b = int(n * 0.9), int(n * 0.95)
    tok = WordTokenizer.train([" ".join(words[:a])], lowercase=True, min_count=1)
    def ids(part):
        return torch.tensor(tok.encode(" ".join(part)), dtype=torch.long)
    return tok, ids(words[:a]), ids(words[a:b]), words[a:b]


class BookWindowsTask:
    """The book's data pipeline: every window of 100 tokens at stride 1, shuffled, batches of
    32, the hidden state carried from one (unrelated) batch to the next, as the book does."""

    metric = "perplexity"
    higher_is_better = False

    def __init__(self, train_ids, valid_ids, cpt, seq_len=100, batch_size=32, seed=0):
        self.ids, self.valid_ids, self.cpt = train_ids, valid_ids, cpt
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.n_windows = train_ids.numel() - seq_len
        self.hidden = None

    def steps_per_epoch(self):
        return self.n_windows // self.batch_size

    def start_epoch(self, epoch):
        pass  # the book never resets the state

    def batches(self, epoch, start):
        order = torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch))
        offsets = torch.arange(self.seq_len + 1)
        for i in range(start, self.steps_per_epoch()):
            starts = order[i * self.batch_size:(i + 1) * self.batch_size]
            windows = self.ids[starts[:, None] + offsets]                    # (B, T+1)
            yield windows[:, :-1], windows[:, 1:]

    def loss(self, model, batch, label_smoothing):
        x, y = batch
        logits, hidden = model(x, self.hidden)
        self.hidden = (hidden[0].detach(), hidden[1].detach())
        return F.cross_entropy(logits.flatten(0, 1), y.flatten()), y.numel()

    def evaluate(self, model):
        nll, count = stream_nll(model, self.valid_ids, torch.device("cpu"))
        return lm_metrics(nll, count, self.cpt)

    def state(self):
        return {}

    def load_state(self, tensors):
        pass


def curve(run_dir: Path) -> list[tuple[float, float]]:
    points = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "val_perplexity" in r:
            points.append((round(r["elapsed"] / 60, 3), round(r["val_perplexity"], 2)))
    return points


def train(name, model, task, config, tok, workdir):
    out = workdir / name
    spec = CheckpointSpec("lstm", vars(model.config), tok.to_json_str(), {"bench": name})
    t0 = time.perf_counter()
    result = fit(model, task, config, out, spec, progress_bar=False)
    print(f"[{name}] {result.steps} steps, {result.elapsed / 60:.1f} min, "
          f"{result.tokens_per_second:,.0f} tok/s, {result.metrics}", file=sys.stderr, flush=True)
    return result, curve(out), time.perf_counter() - t0


def ppl_at(points, minutes):
    """Best validation perplexity reached within `minutes` of training."""
    seen = [p for m, p in points if m <= minutes + 1e-9]
    return min(seen) if seen else None


def minutes_to_reach(points, target):
    for m, p in points:
        if p <= target:
            return m
    return None


@torch.inference_mode()
def scriven_rate(model, prompt, n, batch=1, repeats=5, timed_tokens=2000):
    """Tokens/s of sample_ids at temperature 0.6, top-k 10 (the book's settings); `model` is a
    GPT or an LSTMStepper in some precision. Each timing covers generations of n new tokens
    back to back (prompt read included) until at least `timed_tokens` tokens, so short and long
    generations are timed over intervals of the same length (a single 100-token run lasts ~15
    ms, and the best of a few such short runs would dodge this machine's hiccups that a longer
    one cannot). Best of `repeats` timings."""
    runs = max(1, -(-timed_tokens // (n * batch)))
    best = 0.0
    for r in range(repeats):
        g = torch.Generator().manual_seed(42 + r)
        x = prompt.repeat(batch, 1)
        t = time.perf_counter()
        count = 0
        for _ in range(runs):
            for _ in sample_ids(model, x, n, temperature=0.6, top_k=10, generator=g):  # noqa: B007
                count += batch
        best = max(best, count / (time.perf_counter() - t))
    return best


@torch.inference_mode()
def stepper_perplexity(stepper: LSTMStepper, ids: torch.Tensor, streams: int = 8) -> float:
    """Validation perplexity computed through the generation path one token at a time (ids cut
    into `streams` contiguous streams): what a precision costs in quality."""
    n = (ids.numel() - 1) // streams
    x = ids[: n * streams].view(streams, n)                        # (S, n)
    y = ids[1 : n * streams + 1].view(streams, n)
    logits, state = stepper.read(x[:, :1])
    total = F.cross_entropy(logits, y[:, 0], reduction="sum").item()
    for t in range(1, n):
        logits, state = stepper.step(x[:, t], state)
        total += F.cross_entropy(logits, y[:, t], reduction="sum").item()
    return math.exp(total / (n * streams))


def generation(models: dict, prompt, valid_ids, book_tokens=(100, 2000)) -> dict:
    """Generation speed of each trained LSTM in each precision, beside the book's re-feed loop
    (fp32, the same model), and the validation perplexity each precision gives."""
    out = {}
    for name, model in models.items():
        model.eval()
        row = {"book_refeed_fp32": {str(n): round(book_rate(model, prompt, n)) for n in book_tokens}}
        for precision in PRECISIONS:
            stepper = LSTMStepper(model, precision)
            row[precision] = {
                "single_100": round(scriven_rate(stepper, prompt, 100)),
                "single_2000": round(scriven_rate(stepper, prompt, 2000)),
                "batched_64x200": round(scriven_rate(stepper, prompt, 200, batch=64)),
                "valid_ppl": round(stepper_perplexity(stepper, valid_ids), 2),
            }
            print(f"[generation] {name} {precision}: {row[precision]}", file=sys.stderr, flush=True)
        out[name] = row
    return out


@torch.inference_mode()
def book_rate(model, prompt, n, window=100):
    """The book's generate(): every step re-feeds up to the last 100 tokens *and* carries the
    state, which both costs O(window) per token and reads the same tokens again."""
    torch.manual_seed(42)
    idx = prompt[0].tolist()
    state = None
    t = time.perf_counter()
    for _ in range(n):
        x = torch.tensor(idx[-window:])[None]
        logits, state = model(x, state)
        logits = logits[0, -1] / 0.6
        top = torch.topk(logits, 10)
        choice = torch.multinomial(torch.softmax(top.values, -1), 1)
        idx.append(top.indices[choice].item())
    return n / (time.perf_counter() - t)


def generation_targets(gen: dict) -> dict:
    """Which model/precision pairs meet the issue's generation targets."""
    def meeting(test):
        return [f"{m} {p}" for m, r in gen.items() for p in PRECISIONS if test(r[p])]
    return {
        "single_stream_ge_5000": meeting(lambda r: min(r["single_100"], r["single_2000"]) >= 5000),
        "long_rate_ge_0.9x_short": meeting(lambda r: r["single_2000"] >= 0.9 * r["single_100"]),
        "batched_64_ge_50000": meeting(lambda r: r["batched_64x200"] >= 50000),
    }


def lstm_part(args, tok, train_ids, valid_ids, cpt, workdir, prompt) -> dict:
    # (b) scriven's default: contiguous streams, truncated BPTT, AdamW + warmup/cosine, bf16.
    torch.manual_seed(0)
    ours = LSTMLanguageModel(LSTMConfig.preset("default", tok.vocab_size))
    ours_config = LMTrainConfig(minutes=args.minutes, batch_size=32, seq_len=64, lr=3e-3,
                              warmup_steps=100, eval_every=100, seed=0)
    ours_task = LMTask(train_ids, valid_ids, cpt, 32, 64, torch.device("cpu"))
    ours_result, ours_curve, _ = train("scriven", ours, ours_task, ours_config, tok, workdir)

    # (a) the book's method: stride-1 windows of 100, batch 32, Adam 1e-4, clip 5, seed sizes.
    torch.manual_seed(0)
    book = LSTMLanguageModel(LSTMConfig.preset("seed", tok.vocab_size))
    book_config = LMTrainConfig(minutes=args.book_minutes, batch_size=32, seq_len=100, lr=1e-4,
                              schedule="constant", warmup_steps=0, weight_decay=0.0,
                              betas=(0.9, 0.999), grad_clip=5.0, eval_every=250, amp="off", seed=0)
    book_task = BookWindowsTask(train_ids, valid_ids, cpt)
    book_result, book_curve, _ = train("book", book, book_task, book_config, tok, workdir)

    book_final = book_curve[-1][1]
    ours_reach_book = minutes_to_reach(ours_curve, book_final)
    ours_best = min(p for _, p in ours_curve)

    # Generation speed: scriven's default and the book's model, each in every precision.
    gen = generation({"scriven_default": ours, "book_model": book}, prompt, valid_ids)
    return {
        "quality": {
            "scriven_default": {"minutes": round(ours_result.elapsed / 60, 2),
                                "best_valid_ppl": ours_best,
                                "valid_ppl_at_3min": ppl_at(ours_curve, 3.0),
                                "valid_ppl_at_15min": ppl_at(ours_curve, 15.0),
                                "bits_per_char": round(ours_result.metrics["bits_per_char"], 3),
                                "curve": ours_curve},
            "book_method": {"minutes": round(book_result.elapsed / 60, 2),
                            "final_valid_ppl": book_final, "curve": book_curve},
            "scriven_minutes_to_book_final_ppl": ours_reach_book,
        },
        "training_tokens_per_s": {"scriven_default": round(ours_result.tokens_per_second),
                                  "book_method": round(book_result.tokens_per_second)},
        "generation_tokens_per_s": gen,
        "targets": {
            "ppl_le_100_within_15min": ours_best <= 100 and (ppl_at(ours_curve, 15.0) or math.inf) <= 100,
            "book_30min_ppl_in_under_3min": ours_reach_book is not None and ours_reach_book < 3.0,
            **generation_targets(gen),
        },
    }


def gpt_part(args, tok, train_ids, valid_ids, cpt, workdir, prompt) -> dict:
    """The decoder-only Transformer on the same split: perplexity per minute and generation."""
    torch.manual_seed(0)
    gpt = GPT(GPTConfig.preset("default", tok.vocab_size))
    config = LMTrainConfig(minutes=args.gpt_minutes, batch_size=16, seq_len=128, lr=1e-3,
                         warmup_steps=200, eval_every=200, seed=0)
    task = LMTask(train_ids, valid_ids, cpt, 16, 128, torch.device("cpu"), carries_state=False)
    result, points, _ = train("gpt", gpt, task, config, tok, workdir)
    gpt.eval()
    return {"minutes": round(result.elapsed / 60, 2), "best_valid_ppl": min(p for _, p in points),
            "valid_ppl_at_3min": ppl_at(points, 3.0), "valid_ppl_at_15min": ppl_at(points, 15.0),
            "training_tokens_per_s": round(result.tokens_per_second), "curve": points,
            "generation_tokens_per_s": {
                "single_100": round(scriven_rate(gpt, prompt, 100)),
                "single_2000": round(scriven_rate(gpt, prompt, 2000)),
                "batched_64x200": round(scriven_rate(gpt, prompt, 200, batch=64))}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=15.0, help="scriven default's budget")
    ap.add_argument("--book-minutes", type=float, default=30.0, help="the book method's budget")
    ap.add_argument("--quick", action="store_true", help="2-minute smoke run")
    ap.add_argument("--out", default=None, help="where to keep the runs (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--gpt-minutes", type=float, default=15.0, help="the GPT generator's budget")
    ap.add_argument("--parts", default="lstm,gpt",
                    help="lstm (scriven vs the book, then generation), gpt, or generation alone "
                         "(needs --trained)")
    ap.add_argument("--trained", default=None,
                    help="for --parts generation: an earlier run's --out (its scriven/ and book/)")
    add_profile_argument(ap)
    args = ap.parse_args()
    enter_profile(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.minutes, args.book_minutes, args.gpt_minutes = 0.5, 0.5, 0.5
    parts = set(args.parts.split(","))
    torch.manual_seed(0)
    random.seed(0)
    text = read_text(fetch("anna"))
    tok, train_ids, valid_ids, valid_words = seed_split(text)
    cpt = chars_per_token(tok, valid_words)
    workdir = Path(args.out or tempfile.mkdtemp(prefix="scriven-bench-"))
    print(f"vocab {tok.vocab_size}, tokens train/valid {train_ids.numel()}/{valid_ids.numel()}",
          file=sys.stderr)

    summary = {"bench": "lm",
               "machine": machine_info(args.profile),
               "data": {"vocab": tok.vocab_size, "train_tokens": train_ids.numel(),
                        "valid_tokens": valid_ids.numel(), "split": "token position 90/5/5"}}
    prompt = torch.tensor([tok.encode(PROMPT)], dtype=torch.long)
    if "lstm" in parts:
        summary.update(lstm_part(args, tok, train_ids, valid_ids, cpt, workdir, prompt))
    if "generation" in parts:
        if not args.trained:
            ap.error("--parts generation needs --trained DIR")
        models = {name: ckpt_io.load_model(Path(args.trained) / folder / "best",
                                     torch.device("cpu"), kinds=("lstm",))[0]
                  for name, folder in (("scriven_default", "scriven"), ("book_model", "book"))}
        gen = generation(models, prompt, valid_ids)
        summary["generation_tokens_per_s"] = gen
        summary["targets"] = generation_targets(gen)
    if "gpt" in parts:
        summary["gpt"] = gpt_part(args, tok, train_ids, valid_ids, cpt, workdir, prompt)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
