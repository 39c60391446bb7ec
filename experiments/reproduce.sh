#!/usr/bin/env bash
# Scaled-down reproduction of the fmxcoders and PolySAE comparisons on SmolLM2-135M (offline, CPU).
#   bash experiments/reproduce.sh            # everything: train, evaluate, probe, figure
#   bash experiments/reproduce.sh train      # only the training runs (harvests the cache first)
#   bash experiments/reproduce.sh eval       # metrics.py + probing + experiments/figure.py
#   bash experiments/reproduce.sh length     # extra: crosscoder, fmxcoder TR and CP at 1/4 and 2x TOKENS
# Sizes fit ~70 minutes on a 2-core CPU (measured: harvest 1,844 tok/s with the LM in bfloat16,
# 18 min for the 2 M-token cache; training 39 min; evaluation 12 min); scale them up on a GPU
# (see README "Paper scale").
# The corpus needs gensim's test data: pip install gensim (experiments/corpus.py).
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=11-18                 # 8 middle blocks of SmolLM2-135M's 30 (the train.py default)
MID=15                       # the single middle layer for PolySAE vs TopK SAE
N_LATENTS=1024               # F (paper 16,384)
K=32                         # active latents per token (paper 64)
CACHE_TOKENS=2000000         # ONE shared cache: the whole offline corpus (~2.05 M tokens, experiments/corpus.py)
TOKENS=393216                # training tokens per dictionary, drawn at random from the cache (paper 3e8-5e8)
EVAL_TOKENS=49152            # held-out tokens (end of the cache) for MSE/FVU
LM_DTYPE=bfloat16            # LM weights when harvesting/evaluating: 2x faster here, 0.5-0.7% of variance off float32
BATCH=256                    # tokens per step (paper 4,096)
LR=1e-3
DEAD=20000                   # tokens without firing before AuxK counts a latent as dead
TR_RANK=32                   # fmxcoder TR rank 32x32x32 (train.py default)
CP_RANK=576                  # fmxcoder CP rank (>= d = 576)
MASK=0.05                    # layer-masking probability
POLY_RANKS=576,64,64         # PolySAE ranks (d, 64, 64)
FC_TOKENS=20000              # tokens for functional coherence
PROBE_TRAIN=400              # probe texts per one-vs-rest task (train, test)
PROBE_TEST=200
# (Wasserstein: on the bbc_topic train texts of the probe, PROBE_TRAIN of them)
CORPUS=${CORPUS:-$HOME/.cache/fmxcoders/corpus/offline-2m.jsonl}   # BBC + Wikipedia + ABC news + Python docs
CACHE=${CACHE:-$HOME/.cache/fmxcoders/acts/repro2m-smollm2-L11-18}  # ONE shared 8-layer cache
CACHE1=${CACHE1:-$HOME/.cache/fmxcoders/acts/repro2m-smollm2-L15}   # layer 15 sliced out of it (no 2nd harvest)
R=${RUNS:-runs/repro}

# A finished run (summary.json with "complete": true) is skipped, an interrupted one (Ctrl-C, or killed
# after a checkpoint) resumed, anything else started afresh: re-running the script continues where it stopped.
train() {
  local out=${*: -1}
  if python -c 'import runs, sys; s = runs.read_summary(sys.argv[1]); sys.exit(not (s and s.get("complete", True)))' "$out"; then
    echo "skip $out (done)"
  elif [[ -f $out/checkpoint.pt ]]; then python train.py "$@" --resume
  else python train.py "$@" --overwrite; fi
}

COMMON="--dataset $CORPUS --cache-tokens $CACHE_TOKENS --lm-dtype $LM_DTYPE --n-latents $N_LATENTS --k $K --tokens $TOKENS --eval-tokens $EVAL_TOKENS --batch-size $BATCH --lr $LR --dead-tokens $DEAD --ckpt-every 500 --norm-every 1"   # exact selection norms every step, as the reported runs had (they predate the fmxcoder default of 10)
STAGE=${1:-all}

if [[ $STAGE == all || $STAGE == train ]]; then
  [[ -f $CORPUS ]] || python experiments/corpus.py $CORPUS
  # fmxcoders comparison: every dictionary reads the same cache (layers 11-18)
  train --dict crosscoder --layers $LAYERS --cache $CACHE $COMMON --out $R/crosscoder
  train --dict fmxcoder --factorization tr --rank $TR_RANK --mask-prob $MASK --layers $LAYERS --cache $CACHE $COMMON --out $R/fmx_tr
  # PolySAE vs TopK SAE on layer 15 (same F, k, tokens, batches)
  python experiments/slice_cache.py $CACHE $CACHE1 $MID
  train --dict sae --sparsity topk --layers $MID --cache $CACHE1 $COMMON --out $R/sae_L$MID
  train --dict polysae --sparsity topk --ranks $POLY_RANKS --layers $MID --cache $CACHE1 $COMMON --out $R/polysae_L$MID
  train --dict fmxcoder --factorization cp --rank $CP_RANK --mask-prob $MASK --layers $LAYERS --cache $CACHE $COMMON --out $R/fmx_cp
  train --dict sae --layers $LAYERS --cache $CACHE $COMMON --out $R/sae_per_layer
  # ablations: masking on the crosscoder, no masking on the fmxcoders
  train --dict crosscoder --mask-prob $MASK --layers $LAYERS --cache $CACHE $COMMON --out $R/crosscoder_mask
  train --dict fmxcoder --factorization tr --rank $TR_RANK --mask-prob 0 --layers $LAYERS --cache $CACHE $COMMON --out $R/fmx_tr_nomask
  train --dict fmxcoder --factorization cp --rank $CP_RANK --mask-prob 0 --layers $LAYERS --cache $CACHE $COMMON --out $R/fmx_cp_nomask
fi

MULTI="$R/sae_per_layer $R/crosscoder $R/crosscoder_mask $R/fmx_tr $R/fmx_tr_nomask $R/fmx_cp $R/fmx_cp_nomask"
SINGLE="$R/sae_L$MID $R/polysae_L$MID"
if [[ $STAGE == length ]]; then
  # Does the gap between fmxcoders and the crosscoder, or the crosscoder's FC, move with training length?
  # The same three dictionaries at 1/4 and 2x the main runs' tokens (the 1x points are the main runs).
  LEN_RUNS=""
  for T in $((TOKENS / 4)) $((TOKENS * 2)); do
    C="${COMMON/--tokens $TOKENS/--tokens $T}"
    train --dict crosscoder --layers $LAYERS --cache $CACHE $C --out $R/length/crosscoder_$T
    train --dict fmxcoder --factorization tr --rank $TR_RANK --mask-prob $MASK --layers $LAYERS --cache $CACHE $C --out $R/length/fmx_tr_$T
    train --dict fmxcoder --factorization cp --rank $CP_RANK --mask-prob $MASK --layers $LAYERS --cache $CACHE $C --out $R/length/fmx_cp_$T
    LEN_RUNS="$LEN_RUNS $R/length/crosscoder_$T $R/length/fmx_tr_$T $R/length/fmx_cp_$T"
  done
  python metrics.py $LEN_RUNS --fc-tokens $FC_TOKENS --ce-tokens 0 --wasserstein ''
  python experiments/probe_all.py $LEN_RUNS --task offline --n-train $PROBE_TRAIN --n-test $PROBE_TEST --no-full
  python experiments/figure.py $R
fi

if [[ $STAGE == all || $STAGE == eval ]]; then
  have() { for r in "$@"; do [[ -f $r/summary.json ]] && echo "$r"; done; }
  # reconstruction (held-out cache tokens), FC + decoder-norm spread; Wasserstein comes from probe_all.py below
  python metrics.py $(have $MULTI) --fc-tokens $FC_TOKENS --ce-tokens 0 --wasserstein ''
  # single layer: also the spliced LM loss and interaction vs co-occurrence
  python metrics.py $(have $SINGLE) --ce-tokens 2048 --fc-tokens 0 --wasserstein ''
  # sparse probing on the offline tasks (bbc_topic, us_places, chatterbot_language), probe.py's protocol:
  # the same as `python probe.py RUN --task offline --thorough --n-train $PROBE_TRAIN --n-test $PROBE_TEST --no-full`
  # for every RUN, with one LM pass shared by all runs (+ the class-conditional Wasserstein on bbc_topic)
  python experiments/probe_all.py $(have $MULTI $SINGLE) --task offline --n-train $PROBE_TRAIN --n-test $PROBE_TEST --no-full
  python experiments/figure.py $R
fi
