#!/usr/bin/env bash
# Draw the README's pictures from trained checkpoints:
#
#   scripts/make_figures.sh LM_RUN TRANSLATOR_RUN [OUT_DIR]      (OUT_DIR defaults to docs/img)
#
# LM_RUN: a word-level LSTM run folder or checkpoint (e.g. runs/anna); TRANSLATOR_RUN: an
# English→French translator (e.g. runs/eng-fra). Either may be "-" to skip its pictures.
# What is drawn can be changed with PROMPT, WORDS, SOURCE, TARGET and LAYER in the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
lm=$1
translator=$2
out=${3:-docs/img}
prompt=${PROMPT:-"anna and the prince"}
words=${WORDS:-"anna levin kitty"}
source=${SOURCE:-"The cat is sleeping on the bed."}
layer=${LAYER:--1}
mkdir -p "$out"

# No model needed: the sinusoidal table and its position-by-position dot products.
scriven plot positions --max-len 64 --d-model 128 --out "$out/positions.png"

if [ "$lm" != "-" ]; then
  scriven plot next-token "$lm" "$prompt" --temperatures 0.5 1 1.5 --top-k 10 --top-p 0.9 \
    --show 20 --out "$out/next-token.png"
  # shellcheck disable=SC2086  # WORDS is a list
  scriven plot embeddings "$lm" $words --neighbours 8 --out "$out/embeddings.png"
  if [ -f "$lm/metrics.jsonl" ]; then
    scriven plot curves "$lm" --out "$out/lm-loss.png"
  fi
fi

if [ "$translator" != "-" ]; then
  target_args=()
  if [ -n "${TARGET:-}" ]; then
    target_args=(--target "$TARGET")
  fi
  scriven plot attention "$translator" "$source" "${target_args[@]}" --layer "$layer" \
    --out "$out/attention.png"
  scriven plot attention "$translator" "$source" "${target_args[@]}" --layer "$layer" \
    --kinds cross --out "$out/cross-attention.png"
  if [ -f "$translator/metrics.jsonl" ]; then
    scriven plot curves "$translator" --out "$out/translator-loss.png"
  fi
fi
ls -l "$out"
