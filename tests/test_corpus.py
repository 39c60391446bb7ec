"""experiments/corpus.py: the offline harvest corpus of the reproduction."""
import json
import sys
from pathlib import Path

import pytest

from support import corpora

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
corpus = pytest.importorskip("corpus")


def test_wikipedia_excerpt_is_clean_text():
    pytest.importorskip("gensim")
    docs = corpus.wikipedia()
    assert len(docs) >= 100 and sum(map(len, docs)) > 2_500_000
    assert docs[0].startswith("Anarchism\n\n")                  # the dump's first article, title first
    joined = "".join(docs)
    for markup in ("[[", "]]", "{{", "'''", "<ref"):
        assert markup not in joined, markup


def test_corpus_file_mixes_sources_and_loads(tmp_path):
    pytest.importorskip("gensim")
    out = tmp_path / "c.jsonl"
    corpus.main(str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sources = [r["source"] for r in rows]
    assert {s: sources.count(s) for s in set(sources)}["bbc"] == 2225
    assert set(sources) == {"bbc", "wikipedia", "lee", "pydoc"}
    assert set(sources[-300:]) == set(sources)                   # shuffled: the held-out end mixes them
    texts = list(corpora.load_texts(str(out)))
    assert texts == [r["text"] for r in rows]
