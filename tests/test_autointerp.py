"""autointerp.py: parsing, scoring, the protocol on features with a known ground truth, the answer cache,
the HTTP backend against a local OpenAI-compatible server, and the SmolLM2 judge (slow)."""
import json
import random
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sklearn.metrics import accuracy_score, f1_score

from latents import judge as autointerp

DIGITS = {10 + i: f" {i + 1}" for i in range(9)}
STATES = {20 + i: s for i, s in enumerate([" Texas", " Ohio", " Utah", " Iowa", " Maine"])}
WORDS = {30 + i: " " + w for i, w in enumerate("the cat sat on a mat and dog ran far news today".split())}
VOCAB = {str(k): v for k, v in {**DIGITS, **STATES, **WORDS, 0: "<|endoftext|>"}.items()}
LEFT, RIGHT = 4, 4


def snippet(rng, concept=None):
    """W = 9 filler tokens, a concept token at the peak when given; acts on the concept token."""
    ids = [rng.choice(list(WORDS)) for _ in range(LEFT + 1 + RIGHT)]
    acts = [0.0] * len(ids)
    if concept is not None:
        ids[LEFT] = rng.choice(list(concept))
        acts[LEFT] = round(rng.uniform(1, 5), 3)
    elif rng.random() < 0.5:                     # an incoherent latent: fires on a random filler word
        acts[LEFT] = round(rng.uniform(1, 5), 3)
    ids[0] = 0 if rng.random() < 0.2 else ids[0]  # a special token now and then (never shown)
    return ids, acts


def synthetic_features(tmp_path) -> Path:
    """A features.json with known concepts: latent 0 fires on digits, 1 on US states, 2 on random words;
    3 is dead and 4 fired once (too rare to judge)."""
    rng = random.Random(0)
    pool, kinds = [], []
    for i in range(60):
        kind = ("digits", "states", None)[i % 3]
        pool.append(snippet(rng, {"digits": DIGITS, "states": STATES, None: None}[kind])[0])
        kinds.append(kind)

    def examples(concept, n, window0):
        out = []
        for j in range(n):
            ids, acts = snippet(rng, concept)
            acts[LEFT] = acts[LEFT] or 1.0
            out.append({"act": max(acts), "window": window0 + j, "peak": LEFT, "tokens": ids, "acts": acts})
        return sorted(out, key=lambda e: -e["act"])

    def latent(i, concept, pool_fires, n_top=16):
        top = examples(concept, n_top, 1000 * i)
        bands = [{"band": b + 1, "of": 2, "range": [0, 1], "examples": examples(concept, 2, 1000 * i + 500 + 10 * b)}
                 for b in range(2)] if n_top > 1 else []
        return {"id": i, "fires": 50 * n_top, "density": 0.01, "max_act": top[0]["act"], "mean_act": 1.0,
                "promoted": [[10, 1.0]], "suppressed": [[30, -1.0]], "hist": [1], "top": top, "quantiles": bands,
                "pool_fires": pool_fires}

    lat = [latent(0, DIGITS, [i for i, k in enumerate(kinds) if k == "digits"]),
           latent(1, STATES, [i for i, k in enumerate(kinds) if k == "states"]),
           latent(2, None, sorted(rng.sample(range(60), 15))),
           {"id": 3, "fires": 0, "density": 0.0, "max_act": 0.0, "mean_act": 0.0, "promoted": [], "suppressed": []},
           latent(4, DIGITS, [], n_top=1)]
    feats = {"version": 1, "run": str(tmp_path), "model": "synthetic", "tokens": 10_000, "text": "synthetic",
             "vocab": VOCAB, "special_ids": [0], "hist_edges": [0.01, 1000.0], "settings": {},
             "pool": {"tokens": pool, "window": list(range(60)), "center": [LEFT] * 60},
             "dictionaries": [{"name": "layers 0-2", "kind": "crosscoder", "layers": [0, 1, 2], "n_latents": 5,
                               "alive": 4, "latents": lat}]}
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "features.json").write_text(json.dumps(feats))
    return tmp_path


class KeywordJudge:
    """A rule-following stand-in for a judge model: explains by what all marked tokens share, detects by
    looking for the described tokens; records every prompt."""
    id = "keyword"

    def __init__(self):
        self.prompts = []

    def __call__(self, messages, max_tokens):
        self.prompts.append(messages)
        user = messages[-1]["content"]
        usage = {"prompt_tokens": len(user.split()), "completion_tokens": 5}
        if not user.startswith("Description:"):
            marked = [m.strip() for m in re.findall(r"<<(.*?)>>", user)]
            if all(m.isdigit() for m in marked):
                return "Fires on digits.", usage
            if all(" " + m in STATES.values() for m in marked):
                return "This feature fires on US states.", usage
            return "Fires on assorted words", usage
        desc = user.split("\n")[0]
        if "\nExcerpt: " in user:                  # --detect each: one excerpt, Yes or No
            text = user.split("\nExcerpt: ")[1].split("\n")[0]
            yes = re.search(r"\d", text) if "digits" in desc else any(s.strip() in text for s in STATES.values()) \
                if "states" in desc else random.Random(text).random() < 0.5
            return ("Yes." if yes else "no"), usage
        lines = re.findall(r"^(\d+)\. (.*)$", user, flags=re.M)
        if "digits" in desc:
            picked = [n for n, t in lines if re.search(r"\d", t)]
        elif "states" in desc:
            picked = [n for n, t in lines if any(s.strip() in t for s in STATES.values())]
        else:
            picked = ["1", "2"]
        return (", ".join(picked) if picked else "None"), usage


class Fixed:
    def __init__(self, answer):
        self.answer, self.id = answer, f"fixed:{answer}"

    def __call__(self, messages, max_tokens):
        return self.answer, {}


class Raising:
    id = "keyword"

    def __call__(self, messages, max_tokens):
        raise AssertionError("the judge was called although every answer is cached")


S = autointerp.JudgeSettings(latents=10, n_explain=10, n_detect_top=3)


# ----------------------------------------------------------------------------------------
# Parsing and scoring
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,n,want", [
    ("2, 5, 7", 10, [2, 5, 7]), ("2,5 and 7.", 10, [2, 5, 7]), ("None", 10, []), ("none.", 10, []),
    ("Answer: 3", 10, [3]), ("7 2 2", 10, [2, 7]), ("1, 11", 10, None), ("", 10, None), ("0", 10, None),
    ("I think 2 and 3", 10, None), ("banana", 10, None), ("2, 5, and also", 10, None)])
def test_parse_predictions(answer, n, want):
    assert autointerp.parse_predictions(answer, n) == want


@pytest.mark.parametrize("answer,want", [
    ("Fires on digits.", "digits"), ("This feature fires on US states\nmore", "US states"),
    ('"Fires on the word the."', "the word the"), ("Explanation: numbers in dates", "numbers in dates"),
    ("1. Ireland", "Ireland"), ("", None), ("\n\n???", None), ("12, 99", None)])
def test_parse_explanation(answer, want):
    assert autointerp.parse_explanation(answer) == want


@pytest.mark.parametrize("answer,want", [("Yes", True), ("yes.", True), ("No, it does not", False), (" NO", False),
                                         ("**Yes**", True), ("1. Yes.", True), ("Maybe", None), ("", None),
                                         ("Yesterday", None), ("1. 3", None)])
def test_parse_yes_no(answer, want):
    assert autointerp.parse_yes_no(answer) == want


def test_scores_match_sklearn():
    rng = random.Random(1)
    for _ in range(50):
        n = rng.randint(2, 16)
        truth, pred = [rng.random() < 0.5 for _ in range(n)], [rng.random() < 0.5 for _ in range(n)]
        acc, f1 = autointerp.scores(pred, truth)
        assert acc == pytest.approx(accuracy_score(truth, pred))
        assert f1 == pytest.approx(f1_score(truth, pred, zero_division=0))


def test_render_marks_runs_of_firing_tokens_and_drops_specials():
    e = {"tokens": [0, 30, 10, 11, 31, -1], "acts": [0, 0, 2.0, 1.0, 0, 0]}
    assert autointerp.render(e, VOCAB, {0}, True) == "the<< 1 2>> cat"
    assert autointerp.render(e, VOCAB, {0}, False) == "the 1 2 cat"


# ----------------------------------------------------------------------------------------
# The protocol on known concepts
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("detect", ["batch", "each"])
def test_known_concepts_are_coherent_and_random_ones_are_not(tmp_path, detect):
    run = synthetic_features(tmp_path / "run")
    judge = KeywordJudge()
    rep = autointerp.judge_run(run, judge, autointerp.JudgeSettings(latents=10, detect=detect), progress=False)
    [d] = rep["dictionaries"]
    assert (d["alive"], d["eligible"], d["judged"], d["scored"]) == (4, 3, 3, 3)
    by_id = {x["id"]: x for x in d["latents"]}
    assert by_id[0]["explanation"] == "digits" and by_id[1]["explanation"] == "US states"
    assert by_id[0]["accuracy"] == by_id[1]["accuracy"] == 1.0 and by_id[0]["coherent"] and by_id[1]["coherent"]
    assert not by_id[2]["coherent"]
    for x in d["latents"]:                        # balanced sets; scores recomputed independently
        pred = [i + 1 in x["predicted"] for i in range(len(x["truth"]))]
        assert sum(x["truth"]) * 2 == len(x["truth"]) == 10
        assert x["accuracy"] == pytest.approx(accuracy_score(x["truth"], pred))
        assert x["f1"] == pytest.approx(f1_score(x["truth"], pred, zero_division=0))
    assert d["coherent_fraction"] == pytest.approx(2 / 3) and d["coherent_estimate"] == 2
    assert d["accuracy"] == pytest.approx(sum(x["accuracy"] for x in d["latents"]) / 3)
    explains = [p[-1]["content"] for p in judge.prompts if not p[-1]["content"].startswith("Description:")]
    detects = "\n".join(p[-1]["content"] for p in judge.prompts if p[-1]["content"].startswith("Description:"))
    assert len(explains) == 3 and len(judge.prompts) == 3 + 3 * (1 if detect == "batch" else 10)
    for explain in explains:                       # the detection snippets were never shown for the explanation
        for text in re.findall(r"^\d+\. (.*)$", explain.replace("<<", "").replace(">>", ""), re.M):
            assert text not in detects
    page = (run / "features.html").read_text()
    assert "US states" in page and json.loads((run / "autointerp.json").read_text())["calls"] == len(judge.prompts)


@pytest.mark.parametrize("answer,field", [("", "unparseable_explanations"), ("???", "unparseable_explanations"),
                                          ("banana", "unparseable_detections")])
def test_nonsense_answers_are_counted_not_fatal(tmp_path, answer, field, capsys):
    run = synthetic_features(tmp_path / "run")
    rep = autointerp.judge_run(run, Fixed(answer), S, progress=False)
    [d] = rep["dictionaries"]
    assert d[field] == d["judged"] == 3 and d["scored"] == 0 and d["coherent_fraction"] is None
    print(autointerp.table([rep]))
    assert "   3 " in capsys.readouterr().out         # the unparseable column of the table


def test_rerun_is_answered_from_the_cache(tmp_path):
    run = synthetic_features(tmp_path / "run")
    first = autointerp.judge_run(run, KeywordJudge(), S, progress=False)
    with open(run / "autointerp_cache.jsonl", "a") as f:
        f.write('{"key": "cut by an interrupted ru')   # a torn last line is skipped
    again = autointerp.judge_run(run, Raising(), S, progress=False)
    assert again["dictionaries"] == first["dictionaries"]
    assert (again["calls"], again["cached_calls"]) == (0, 6) and again["usage"] == first["usage"]


# ----------------------------------------------------------------------------------------
# HTTP: a local OpenAI-compatible server
# ----------------------------------------------------------------------------------------


def serve(answer, seen=None, status=200, raw=None):
    """An OpenAI-compatible /v1/chat/completions on 127.0.0.1 answering with answer(messages, max_tokens)."""
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if seen is not None:
                seen.append((self.path, self.headers.get("Authorization"), req))
            if raw is not None:
                body = raw
            else:
                text, usage = answer(req["messages"], req["max_tokens"])
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}],
                                   "usage": usage}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


def test_http_judge_gives_the_direct_judges_results(tmp_path, monkeypatch):
    monkeypatch.setenv("FMX_TEST_KEY", "sk-test")
    seen = []
    server, url = serve(KeywordJudge(), seen)
    try:
        direct = autointerp.judge_run(synthetic_features(tmp_path / "a"), KeywordJudge(), S, progress=False)
        http = autointerp.judge_run(synthetic_features(tmp_path / "b"),
                                    autointerp.HTTPJudge(url, "kw", key_env="FMX_TEST_KEY"), S, progress=False)
    finally:
        server.shutdown()
    assert http["dictionaries"] == direct["dictionaries"] and http["usage"] == direct["usage"]
    path, auth, req = seen[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test"
    assert req["model"] == "kw" and req["temperature"] == 0 and req["max_tokens"] == S.explain_tokens


def test_http_garbage_is_unparseable_and_errors_are_one_line(tmp_path, capsys):
    server, url = serve(None, raw=b"<html>not json</html>")
    try:
        rep = autointerp.judge_run(synthetic_features(tmp_path / "a"), autointerp.HTTPJudge(url, "m"), S, progress=False)
    finally:
        server.shutdown()
    assert rep["dictionaries"][0]["unparseable_explanations"] == 3
    server, url = serve(None, status=400, raw=b'{"error": "no such model"}')
    try:
        with pytest.raises(autointerp.JudgeError, match="HTTP 400.*no such model"):
            autointerp.HTTPJudge(url, "m", retries=0)([{"role": "user", "content": "hi"}], 5)
    finally:
        server.shutdown()
    run = synthetic_features(tmp_path / "b")
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()                         # nothing listens on this port now
    assert autointerp.main([str(run), "--judge", f"http://127.0.0.1:{port}/v1", "--judge-model", "m", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the judge at http://127.0.0.1") and err.count("\n") == 1
    assert autointerp.main([str(run), "--judge", "http://127.0.0.1:1/v1"]) == 2
    assert "needs --judge-model" in capsys.readouterr().err
    assert autointerp.main([str(tmp_path / "nothing")]) == 2
    assert "run python -m latents.features" in capsys.readouterr().err
    assert autointerp.main([str(run), "--device", "gpu"]) == 2      # checked before the judge loads
    assert capsys.readouterr().err == "error: --device must be auto, cpu, cuda or cuda:N, got 'gpu'\n"


@pytest.mark.slow
def test_smollm2_judge_locally_and_behind_the_http_server(tmp_path):
    """The whole pipeline with SmolLM2-135M-Instruct as the judge (a pipeline check: the model is far
    too weak to judge), directly and through the HTTP backend: the same greedy answers."""
    local = autointerp.LocalJudge("smollm2-135m")
    s = autointerp.JudgeSettings(latents=1, explain_tokens=24, detect_tokens=12)
    direct = autointerp.judge_run(synthetic_features(tmp_path / "a"), local, s, progress=False)
    server, url = serve(local)
    try:
        http = autointerp.judge_run(synthetic_features(tmp_path / "b"), autointerp.HTTPJudge(url, "smollm2"), s,
                                    progress=False)
    finally:
        server.shutdown()
    [d], [h] = direct["dictionaries"], http["dictionaries"]
    assert d["judged"] == 1 and d["scored"] + d["unparseable_explanations"] + d["unparseable_detections"] == 1
    assert h["latents"][0]["explain_answer"] == d["latents"][0]["explain_answer"] != ""
    assert h["latents"][0].get("detect_answer") == d["latents"][0].get("detect_answer")
    assert direct["usage"]["prompt_tokens"] > 100 and direct["usage"] == http["usage"]


class BrokenThenFixed(KeywordJudge):
    """The same judge (same id) answering garbage until it is fixed."""
    broken = True

    def __call__(self, messages, max_tokens):
        return ("", {}) if self.broken else super().__call__(messages, max_tokens)


def test_a_malformed_answer_is_not_cached_so_a_fixed_judge_is_asked_again(tmp_path):
    run = synthetic_features(tmp_path / "run")
    judge = BrokenThenFixed()
    first = autointerp.judge_run(run, judge, S, progress=False)
    assert first["dictionaries"][0]["unparseable_explanations"] == 3 and first["calls"] == 3
    assert not (run / "autointerp_cache.jsonl").exists() or not (run / "autointerp_cache.jsonl").read_text()
    judge.broken = False
    again = autointerp.judge_run(run, judge, S, progress=False)
    assert again["calls"] == 6 and again["dictionaries"][0]["scored"] == 3       # asked again, scored now
    assert autointerp.judge_run(run, Raising(), S, progress=False)["cached_calls"] == 6   # and cached since


def test_judge_timeout_reaches_the_http_judge(tmp_path, monkeypatch):
    made = []
    monkeypatch.setattr(autointerp, "judge_run", lambda run, judge, s, progress: made.append(judge) or
                        {"run": run, "judge": judge.id, "calls": 0, "cached_calls": 0, "dictionaries": [],
                         "usage": {"prompt_tokens": 0, "completion_tokens": 0}, "tokens_per_latent": None})
    run = synthetic_features(tmp_path / "run")
    assert autointerp.main([str(run), "--judge", "http://127.0.0.1:1/v1", "--judge-model", "m",
                            "--judge-timeout", "12.5", "--quiet"]) == 0
    assert made[0].timeout == 12.5
    assert autointerp.main([str(run), "--judge", "http://127.0.0.1:1/v1", "--judge-model", "m",
                            "--judge-timeout", "0"]) == 2
