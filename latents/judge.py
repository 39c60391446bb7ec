"""LLM-as-a-judge: how many latents of a dictionary are semantically coherent (autointerp, detection).

    python -m latents.judge RUN_DIR [RUN_DIR ...] --judge local:smollm2-135m          # offline pipeline check
    python -m latents.judge runs/cc runs/fmx --judge http://localhost:8000/v1 --judge-model Qwen/Qwen2.5-72B-Instruct

reads RUN_DIR/features.json (latents/features.py), judges `--latents` latents of every dictionary of the run, writes
RUN_DIR/autointerp.json, adds the explanations to RUN_DIR/features.html, and prints one row per dictionary.
The fmxcoders paper (arXiv 2605.09438, abstract) counts "semantically coherent latents" with an LLM judge
(3–13× more for fmxcoders than for standard crosscoders) without giving the protocol; this is the
detection protocol of the autointerp literature (Bills et al. 2023; Paulo et al. 2024, arXiv 2410.13928;
SAEBench's autointerp, Karvonen et al. 2025):

  1. explain. The judge sees the latent's first `n_explain` top examples and the first example of each
     quantile band (latents/features.py), the tokens where the latent fires marked <<like this>>, and writes a
     one-sentence explanation.
  2. detect. In a new conversation it sees the explanation and 2n shuffled, unmarked held-out snippets:
     n activating ones (the next `n_detect_top` top examples and the second example of each band, never
     shown in step 1) and n on which the latent is exactly zero (random snippets of the pool), and answers
     with the numbers of those that it predicts contain the concept (`--detect batch`, SAEBench's form;
     `--detect each` asks instead one Yes/No question per snippet, 2n calls of at most 4 answer tokens, which
     small local judges follow far more reliably than a list format).
  3. score. Detection accuracy over the 2n snippets (balanced: chance is 0.5) and F1 of the activating
     class. A latent is *coherent* when its accuracy ≥ `threshold` (0.8 by default).
Per dictionary: the fraction of judged latents that are coherent, that fraction × the eligible latents
(an estimate of the number of coherent latents, the paper's count), mean accuracy and F1, and the number
of answers that could not be parsed (a latent with one is not scored; nothing crashes on nonsense).
A latent is eligible when it fired and has at least `min_positives` held-out activating examples and as
many non-activating pool snippets.

Judges: any OpenAI-compatible /chat/completions endpoint (vLLM, llama.cpp's server, Ollama, hosted APIs;
key from the environment variable `--api-key-env`) or a local Hugging Face causal LM (greedy decoding,
its chat template). Every answer is cached in RUN_DIR/autointerp_cache.jsonl under a hash of (judge,
messages, max_tokens), so a rerun costs nothing. The usage (prompt and completion tokens) is counted and
printed; README.md gives the measured cost per latent.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import random
import re
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from core import opt
from support import cli
from support.files import json_text, write_atomic

EXPLAIN_PROMPT = (
    "You are helping to interpret a feature of a language model. The feature fires on certain tokens. "
    "Below are text excerpts where it fires; the tokens on which it fires are marked <<like this>>. "
    "Find what the marked tokens have in common (a word, a spelling pattern, a topic, a grammatical role) "
    "and describe it in one short sentence of at most 15 words, starting with \"Fires on\". "
    "Answer with that sentence only.")
DETECT_PROMPT = (
    "You are helping to interpret a feature of a language model. You get a description of what the feature "
    "fires on and {n} numbered text excerpts. Some contain what the description says, some do not. Answer "
    "with the numbers of the excerpts that contain it, separated by commas (for example: {example}), "
    "or with the word None. Answer with the numbers only.")
EACH_PROMPT = (
    "You are helping to interpret a feature of a language model. You get a description of what the feature "
    "fires on and one text excerpt. Answer Yes if the excerpt contains what the description says, else No.")


@dataclass
class JudgeSettings:
    """The protocol's settings (flags of python -m latents.judge)."""
    latents: int = opt(50, "latents judged per dictionary (a seeded random sample of the eligible ones)")
    n_explain: int = opt(10, "top examples shown to explain (plus one per quantile band)")
    n_detect_top: int = opt(3, "further top examples among the activating snippets (plus one per band)")
    min_positives: int = opt(2, "fewer held-out activating snippets: not eligible")
    threshold: float = opt(0.8, "detection accuracy at which a latent counts as coherent")
    explain_tokens: int = opt(40, "max tokens of the explanation")
    detect_tokens: int = opt(40, "max tokens of the detection answer")
    detect: str = opt("batch", "batch: one call lists the numbers (SAEBench) | each: a Yes/No call per excerpt")
    seed: int = opt(0, "seed of the latents and snippets chosen")

    def check(self, name=str) -> None:
        cli.check_min((name("latents"), self.latents, 1), (name("n_explain"), self.n_explain, 1),
                      (name("n_detect_top"), self.n_detect_top, 0), (name("min_positives"), self.min_positives, 1),
                      (name("explain_tokens"), self.explain_tokens, 1), (name("detect_tokens"), self.detect_tokens, 1))
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"{name('threshold')} is a detection accuracy, between 0 and 1, got {self.threshold}")
        if self.detect not in ("batch", "each"):
            raise ValueError(f"{name('detect')} must be batch or each, got {self.detect!r}")


class JudgeError(RuntimeError):
    """The judge cannot be used at all (unreachable, refusing): a one-line message."""


# ----------------------------------------------------------------------------------------
# Text of the examples, prompts, parsing
# ----------------------------------------------------------------------------------------


def render(example: dict, vocab: dict, special: set, mark: bool) -> str:
    """The snippet as one line of text; with mark, runs of firing tokens inside <<...>>."""
    out, open_ = [], False
    for tid, act in zip(example["tokens"], example.get("acts") or [0.0] * len(example["tokens"])):
        if tid < 0 or tid in special:
            continue
        on = mark and act > 0
        if on != open_:
            out.append("<<" if on else ">>")
            open_ = on
        out.append(vocab.get(str(tid), "").replace("\n", "↵"))
    return "".join(out + ([">>"] if open_ else [])).strip()


def explain_messages(texts: list[str]) -> list[dict]:
    body = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
    return [{"role": "system", "content": EXPLAIN_PROMPT}, {"role": "user", "content": f"Excerpts:\n{body}"}]


def detect_messages(explanation: str, texts: list[str]) -> list[dict]:
    example = ", ".join(str(i) for i in sorted(random.Random(len(texts)).sample(range(1, len(texts) + 1), 3)))
    body = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))
    return [{"role": "system", "content": DETECT_PROMPT.format(n=len(texts), example=example)},
            {"role": "user", "content": f"Description: {explanation}\n\nExcerpts:\n{body}"}]


def each_messages(explanation: str, text: str) -> list[dict]:
    return [{"role": "system", "content": EACH_PROMPT},
            {"role": "user", "content": f"Description: {explanation}\n\nExcerpt: {text}\n\nYes or No?"}]


def parse_yes_no(answer: str) -> bool | None:
    """True / False for an answer starting with yes / no (any case, after a list number such as "1."),
    else None."""
    m = re.match(r"\W*(?:\d+[.)]\s*)?\W*(yes|no)\b", answer.strip().lower())
    return None if m is None else m.group(1) == "yes"


def parse_explanation(answer: str) -> str | None:
    """The first non-empty line, a list number, quotes and a leading "Fires on"/"This feature fires on"
    dropped; None when nothing of at least two letters is left."""
    line = next((ln.strip() for ln in answer.splitlines() if ln.strip()), "")
    line = re.sub(r"^\d+[.)]\s+", "", line)
    line = re.sub(r"^(explanation|answer)\s*:\s*", "", line, flags=re.I).strip(" \"'*`")
    line = re.sub(r"^(this|the)\s+(feature|neuron|latent)\s+", "", line, flags=re.I)
    line = re.sub(r"^(fires|activates)\s+on\s+", "", line, flags=re.I).rstrip(".").strip()
    return line if len(re.findall(r"[A-Za-z]", line)) >= 2 else None


def parse_predictions(answer: str, n: int) -> list[int] | None:
    """The excerpt numbers in an answer like "2, 5 and 7" or "None" (→ []); None when the answer is
    not a list of numbers in 1..n (words other than 'and'/'none', numbers out of range, empty)."""
    text = answer.strip().strip(".").lower()
    text = re.sub(r"^(answer|excerpts?)\s*:\s*", "", text)
    if re.fullmatch(r"none\.?", text):
        return []
    parts = [p for p in re.split(r"[,\s;]+|\band\b", text) if p]
    if not parts or not all(p.isdigit() and 1 <= int(p) <= n for p in parts):
        return None
    return sorted(set(int(p) for p in parts))


def scores(pred: list[bool], truth: list[bool]) -> tuple[float, float]:
    """(accuracy, F1 of the positive class; 0 when nothing is predicted or positive)."""
    tp = sum(p and t for p, t in zip(pred, truth))
    fp = sum(p and not t for p, t in zip(pred, truth))
    fn = sum(t and not p for p, t in zip(pred, truth))
    acc = sum(p == t for p, t in zip(pred, truth)) / len(truth)
    return acc, (2 * tp / (2 * tp + fp + fn) if tp else 0.0)


# ----------------------------------------------------------------------------------------
# Judges: a callable (messages, max_tokens) -> (text, {"prompt_tokens", "completion_tokens"})
# ----------------------------------------------------------------------------------------


class HTTPJudge:
    """An OpenAI-compatible chat endpoint: POST {url}/chat/completions, temperature 0."""

    def __init__(self, url: str, model: str, key_env: str = "OPENAI_API_KEY", timeout: float = 300, retries: int = 3):
        self.url = url.rstrip("/") if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.model, self.key, self.timeout, self.retries = model, os.environ.get(key_env), timeout, retries
        self.id = f"{self.url}|{model}"

    def __call__(self, messages: list[dict], max_tokens: int) -> tuple[str, dict]:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {self.key}"} if self.key else {})
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(self.url, body, headers), timeout=self.timeout) as r:
                    data = json.loads(r.read().decode("utf-8", errors="replace"))
                break
            except urllib.error.HTTPError as e:
                if e.code in (429, 500, 502, 503, 504) and attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                raise JudgeError(f"judge {self.url} answered HTTP {e.code}: "
                                 f"{e.read().decode(errors='replace')[:200].strip()}") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
                raise JudgeError(f"cannot reach the judge at {self.url}: {getattr(e, 'reason', e)}") from None
            except http.client.HTTPException as e:     # IncompleteRead: the server closed mid-answer
                if attempt < self.retries:
                    time.sleep(2 ** attempt)
                    continue
                raise JudgeError(f"the judge at {self.url} closed the connection in the middle of its answer "
                                 f"({type(e).__name__}), {self.retries + 1} times: check the server") from None
            except json.JSONDecodeError:
                return "", {}                          # not JSON: an unparseable answer, counted
        try:
            text = data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            text = ""
        usage = data.get("usage") or {} if isinstance(data, dict) else {}
        return text, {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}


class LocalJudge:
    """A local Hugging Face causal LM (activations.load_lm names: smollm2-135m, a folder, a hub name), greedy.
    Uses the tokenizer's chat template; a model without one gets "role: content" lines."""

    def __init__(self, name: str, device="cpu"):
        import activations

        self.lm, self.tok = activations.load_lm(name, device=device)
        self.id = f"local:{name}"

    def __call__(self, messages: list[dict], max_tokens: int) -> tuple[str, dict]:
        import torch

        if self.tok.chat_template:
            prompt = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        ids = self.tok(prompt, return_tensors="pt", add_special_tokens=False).to(self.lm.device)
        with torch.no_grad():
            out = self.lm.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                   pad_token_id=self.tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:]
        return (self.tok.decode(new, skip_special_tokens=True),
                {"prompt_tokens": ids["input_ids"].shape[1], "completion_tokens": len(new)})


def make_judge(spec: str, model: str | None = None, key_env: str = "OPENAI_API_KEY", device="cpu",
               timeout: float = 300):
    """"local:NAME" → LocalJudge(NAME); "http(s)://..." → HTTPJudge (needs the model name)."""
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ValueError("an HTTP judge needs --judge-model (the model name the endpoint serves)")
        return HTTPJudge(spec, model, key_env, timeout)
    if spec.startswith("local:"):
        return LocalJudge(spec[len("local:"):], device)
    raise ValueError(f"--judge must be local:NAME or an http(s):// URL, got {spec!r}")


class CachedJudge:
    """Answers from RUN_DIR/autointerp_cache.jsonl when asked before; else asks the judge and appends. Only
    answers that parse are kept: a malformed one (a broken server, a judge off its format) is asked again
    on the next run, as is one cached by an earlier version of this code."""

    def __init__(self, judge, path):
        self.judge, self.path, self.answers = judge, Path(path), {}
        self.calls = self.hits = 0
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    self.answers[row["key"]] = row
                except (json.JSONDecodeError, KeyError):
                    continue                        # a line cut by an interrupted run

    def __call__(self, messages: list[dict], max_tokens: int, parse=lambda answer: answer) -> str:
        """The judge's answer; `parse(answer)` is None for an answer that cannot be used (not cached)."""
        key = hashlib.sha256(json.dumps([self.judge.id, messages, max_tokens]).encode()).hexdigest()
        row = self.answers.get(key)
        if row is None or parse(row["answer"]) is None:
            text, usage = self.judge(messages, max_tokens)
            row = {"key": key, "answer": text, "usage": usage}
            if parse(text) is not None:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                self.answers[key] = row
            self.calls += 1
        else:
            self.hits += 1
        for k in self.usage:
            self.usage[k] += int(row.get("usage", {}).get(k, 0))
        return row["answer"]


# ----------------------------------------------------------------------------------------
# One latent, one dictionary
# ----------------------------------------------------------------------------------------


def example_sets(r: dict, n_pool: int, s: JudgeSettings, rng: random.Random):
    """(examples to explain from, activating held-out examples, pool indices of non-activating ones)."""
    bands = [b["examples"] for b in r.get("quantiles", [])]
    explain = r.get("top", [])[:s.n_explain] + [b[0] for b in bands if b]
    positives = r.get("top", [])[s.n_explain:s.n_explain + s.n_detect_top] + [b[1] for b in bands if len(b) > 1]
    fired = set(r.get("pool_fires", []))
    quiet = [i for i in range(n_pool) if i not in fired]
    return explain, positives, rng.sample(quiet, min(len(positives), len(quiet)))


def eligible(r: dict, n_pool: int, s: JudgeSettings) -> bool:
    if not r.get("fires"):
        return False
    _, pos, neg = example_sets(r, n_pool, s, random.Random(0))
    return len(pos) >= s.min_positives and len(neg) >= s.min_positives


def judge_latent(r: dict, feats: dict, judge, s: JudgeSettings, rng: random.Random) -> dict:
    """Explain, detect, score one latent record of features.json."""
    vocab, special = feats["vocab"], set(feats["special_ids"])
    pool = [{"tokens": t} for t in feats["pool"]["tokens"]]
    explain, positives, neg_idx = example_sets(r, len(pool), s, rng)
    n = min(len(positives), len(neg_idx))
    items = [(render(e, vocab, special, False), True) for e in positives[:n]]
    items += [(render(pool[i], vocab, special, False), False) for i in neg_idx[:n]]
    rng.shuffle(items)
    answer = judge(explain_messages([render(e, vocab, special, True) for e in explain]), s.explain_tokens,
                   parse_explanation)
    explanation = parse_explanation(answer)
    out = {"id": r["id"], "explanation": explanation, "explain_answer": answer, "truth": [t for _, t in items]}
    if explanation is None:
        return out | {"status": "unparseable explanation"}
    if s.detect == "each":
        answers = [judge(each_messages(explanation, t), min(s.detect_tokens, 4), parse_yes_no) for t, _ in items]
        said = [parse_yes_no(a) for a in answers]
        picked = None if None in said else [i + 1 for i, yes in enumerate(said) if yes]
        out["detect_answer"] = answers
    else:
        out["detect_answer"] = judge(detect_messages(explanation, [t for t, _ in items]), s.detect_tokens,
                                     lambda a: parse_predictions(a, len(items)))
        picked = parse_predictions(out["detect_answer"], len(items))
    if picked is None:
        return out | {"status": "unparseable detection"}
    pred = [i + 1 in picked for i in range(len(items))]
    acc, f1 = scores(pred, out["truth"])
    return out | {"status": "ok", "predicted": picked, "accuracy": acc, "f1": f1, "coherent": acc >= s.threshold}


def judge_dictionary(d: dict, feats: dict, judge, s: JudgeSettings, progress: bool = True) -> dict:
    from tqdm import tqdm

    n_pool = len(feats["pool"]["tokens"])
    ok = [r for r in d["latents"] if eligible(r, n_pool, s)]
    chosen = sorted(random.Random(f"{s.seed}|{d['name']}").sample(ok, min(s.latents, len(ok))), key=lambda r: r["id"])
    results = [judge_latent(r, feats, judge, s, random.Random(f"{s.seed}|{d['name']}|{r['id']}"))
               for r in tqdm(chosen, desc=f"judge {d['name']}", disable=not progress, dynamic_ncols=True)]
    scored = [x for x in results if x["status"] == "ok"]
    frac = sum(x["coherent"] for x in scored) / len(scored) if scored else None
    mean = (lambda k: sum(x[k] for x in scored) / len(scored) if scored else None)
    return {"name": d["name"], "kind": d["kind"], "alive": d["alive"], "eligible": len(ok), "judged": len(results),
            "scored": len(scored),
            "unparseable_explanations": sum(x["status"] == "unparseable explanation" for x in results),
            "unparseable_detections": sum(x["status"] == "unparseable detection" for x in results),
            "accuracy": mean("accuracy"), "f1": mean("f1"), "coherent_fraction": frac,
            "coherent_estimate": None if frac is None else round(frac * len(ok)), "latents": results}


def judge_run(run_dir, judge, s: JudgeSettings, progress: bool = True) -> dict:
    """Judge every dictionary of a run folder; writes autointerp.json and the page with the explanations."""
    from latents import page

    from support.runs import read_result

    if not Path(run_dir, "features.json").exists():
        raise FileNotFoundError(f"no features.json in {str(run_dir)!r}: run python -m latents.features {run_dir} first")
    feats = read_result(run_dir, "features.json")        # refused when the run's model was replaced since
    cached = CachedJudge(judge, Path(run_dir, "autointerp_cache.jsonl"))
    dicts = [judge_dictionary(d, feats, cached, s, progress) for d in feats["dictionaries"]]
    n_judged = sum(d["judged"] for d in dicts)
    report = {"run": str(run_dir), "judge": judge.id, "settings": asdict(s), "dictionaries": dicts,
              "calls": cached.calls, "cached_calls": cached.hits, "usage": cached.usage,
              "tokens_per_latent": (sum(cached.usage.values()) / n_judged) if n_judged else None}
    write_atomic(Path(run_dir, "autointerp.json"), json_text(report, indent=1))
    judged = {d["name"]: {x["id"]: {"explanation": x["explanation"] or "(unparseable)", "accuracy": x.get("accuracy"),
                                    "f1": x.get("f1")} for x in d["latents"]} for d in dicts}
    page.write_page(feats, Path(run_dir, "features.html"), judged)
    return report


# ----------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------


def table(reports: list[dict]) -> str:
    head = ["run", "dictionary", "alive", "eligible", "judged", "unparseable", "accuracy", "F1", "coherent", "≈ count"]
    rows = []
    for rep in reports:
        for d in rep["dictionaries"]:
            f = (lambda v, p=".3f": "-" if v is None else format(v, p))
            rows.append([Path(rep["run"]).name, f"{d['kind']} {d['name']}", d["alive"], d["eligible"], d["judged"],
                         d["unparseable_explanations"] + d["unparseable_detections"], f(d["accuracy"]), f(d["f1"]),
                         f(d["coherent_fraction"]), "-" if d["coherent_estimate"] is None else d["coherent_estimate"]])
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(c).rjust(n) for c, n in zip(r, w)) for r in [head, *rows]]
    for rep in reports:
        lines.append(f"{rep['run']}: judge {rep['judge']}, {rep['calls']} calls + {rep['cached_calls']} cached, "
                     f"{rep['usage']['prompt_tokens']:,} prompt + {rep['usage']['completion_tokens']:,} completion tokens"
                     + (f" ({rep['tokens_per_latent']:,.0f} per latent)" if rep["tokens_per_latent"] else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders with a features.json (python -m latents.features RUN_DIR)")
    p.add_argument("--judge", default="local:smollm2-135m", help="local:NAME (a local HF model) or an http(s):// "
                   "OpenAI-compatible base URL, e.g. http://localhost:8000/v1 (default local:smollm2-135m)")
    p.add_argument("--judge-model", default=None, help="model name sent to an HTTP judge")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    p.add_argument("--judge-timeout", type=float, default=300, help="seconds to wait for one answer of an HTTP "
                   "judge (default 300)")
    p.add_argument("--device", default="cpu", help="device of a local judge: auto | cpu | cuda | cuda:N")
    cli.add_flags(p, JudgeSettings, group="the protocol")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    try:
        a = p.parse_args(argv)
        s = cli.build(JudgeSettings, **cli.values(a, JudgeSettings))
        if a.judge.startswith("local:"):
            a.device = cli.resolve_device(a.device)
        missing = [r for r in a.runs if not Path(r, "features.json").exists()]
        if missing:
            raise FileNotFoundError(f"no features.json in {missing[0]!r}: run python -m latents.features {missing[0]} first")
        if not a.judge_timeout > 0:
            raise ValueError(f"--judge-timeout must be a number of seconds > 0, got {a.judge_timeout}")
        judge = make_judge(a.judge, a.judge_model, a.api_key_env, a.device, a.judge_timeout)
        if judge.id == "local:smollm2-135m":
            print("note: SmolLM2-135M is far too weak a judge for conclusions; this run checks the pipeline")
        reports = [judge_run(r, judge, s, progress=not a.quiet) for r in a.runs]
    except (*cli.USER_ERRORS, JudgeError) as e:
        return cli.cli_error(e)
    print(table(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
