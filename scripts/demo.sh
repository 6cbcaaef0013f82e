#!/usr/bin/env bash
# Set up, train the word-level LSTM on Anna Karenina for about 10 minutes, then generate from
# the book's three prompts. Set SCRIVEN_DATA_MIRROR=<folder> to read the novel offline.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet torch==2.13.0 -e .
scriven data fetch anna
scriven train lm anna --out runs/anna --minutes "${MINUTES:-10}" --overwrite  # the demo replaces its own run
for prompt in "Anna and the prince" "I 'm not going to see" "Anna and the nurse"; do
  scriven generate runs/anna "$prompt" --max-new-tokens 100 --temperature 0.6 --top-k 10 --seed 42
  echo
done
