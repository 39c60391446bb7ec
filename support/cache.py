"""The disk cache of harvested activations: run the LM once, train many dictionaries on its output.

Disk cache (one folder):
    meta.json            model, n_blocks, layers, hooks (module paths), d, dtype, n_tokens, dataset,
                         split, context, drop_outliers, scale, scale_tokens, tokens_per_s, version, ...,
                         and meta_sha256, the sha256 of the rest (canonical JSON, sorted keys)
    acts_00000.bin ...   raw row-major (n_i, L, d) arrays of `dtype` (float16 default), opened with
                         np.memmap; shard i holds tokens [i·shard_tokens, (i+1)·shard_tokens)
The folder is written under a temporary name and renamed when complete (atomic: a crash never
leaves a half cache behind). Opening a cache checks meta.json against its checksum and every shard's
size against n·L·d·itemsize, so a damaged cache is refused with its folder named, never half read. Token order in the cache is corpus order; shuffle when reading.

A cache is reused by every run with the same model, layers, data and harvesting settings
(`build_cache`; `default_cache_path` names the folder after a hash of those settings), and read as
raw (N, L, d) activations: `read(start, stop)` in corpus order, `take(idx)` for a shuffled batch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

import activations
from support.corpora import check_dataset, dataset_batches, is_token_corpus, token_file
from support.files import check_free, disk_full, remove_stale, temp_path, write_atomic


VERSION = 1                      # bump when the cache format or harvesting semantics change


SHARD_BYTES = 256 * 2**20        # target size of one cache shard


DTYPES = {"float16": np.float16, "float32": np.float32}          # cache storage


META_FIELDS = {"model": str, "n_blocks": int, "layers": list, "d": int, "dtype": str, "n_tokens": int,
               "scale": list, "shard_tokens": int, "shards": list}


def meta_checksum(meta: dict) -> str:
    """sha256 of the canonical JSON (sorted keys) of a cache's metadata, without its own entry."""
    rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def write_meta(folder: Path, meta: dict) -> None:
    """Write a cache's meta.json with its checksum "meta_sha256", atomically."""
    write_atomic(Path(folder) / "meta.json", json.dumps({**meta, "meta_sha256": meta_checksum(meta)}, indent=2))


def read_meta(folder: Path) -> dict:
    """A cache's meta.json, checked against the folder: the fields ActivationCache needs, the
    checksum (caches written before it existed have none), and every shard file present with
    exactly n·L·d·itemsize bytes. FileNotFoundError without meta.json; ValueError naming the folder,
    what is wrong and the fix otherwise."""
    def corrupt(what: str) -> ValueError:
        return ValueError(f"activation cache {str(folder)!r} is damaged: {what}; delete the folder to rebuild it, "
                          f"or pass another --cache")

    meta_file = Path(folder) / "meta.json"
    if not meta_file.exists():
        raise FileNotFoundError(f"no meta.json in {str(folder)!r}: not an activation cache")
    try:
        meta = json.loads(meta_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise corrupt(f"meta.json is not valid JSON, truncated? ({e})") from e
    if not isinstance(meta, dict):
        raise corrupt(f"meta.json holds a {type(meta).__name__}, not an object")
    for key, typ in META_FIELDS.items():
        if not isinstance(meta.get(key), typ) or isinstance(meta.get(key), bool):
            raise corrupt(f"meta.json has no {typ.__name__} {key!r} (got {meta.get(key)!r:.60})")
    if "meta_sha256" in meta and meta["meta_sha256"] != meta_checksum(meta):
        raise corrupt("meta.json does not match its checksum meta_sha256 (edited or damaged)")
    L, d = len(meta["layers"]), meta["d"]
    if meta["dtype"] not in DTYPES:
        raise corrupt(f"meta.json has dtype {meta['dtype']!r}, not one of {list(DTYPES)}")
    if len(meta["scale"]) != L:
        raise corrupt(f"meta.json has {len(meta['scale'])} scales for {L} layers")
    if not all(isinstance(sh, list) and len(sh) == 2 and isinstance(sh[0], str) and Path(sh[0]).name == sh[0]
               and isinstance(sh[1], int) and sh[1] >= 0 for sh in meta["shards"]):
        raise corrupt("meta.json's shards are not a list of [file name, tokens]")
    if sum(n for _, n in meta["shards"]) != meta["n_tokens"]:
        raise corrupt(f"meta.json's shards hold {sum(n for _, n in meta['shards']):,} tokens, "
                      f"its n_tokens says {meta['n_tokens']:,}")
    itemsize = np.dtype(DTYPES[meta["dtype"]]).itemsize
    for name, n in meta["shards"]:
        f = Path(folder) / name
        if not f.is_file():
            raise corrupt(f"shard {name} is missing")
        want = n * L * d * itemsize
        if f.stat().st_size != want:
            raise corrupt(f"shard {name} holds {f.stat().st_size:,} bytes, not the {want:,} of {n:,} tokens × "
                          f"{L} layers × {d} × {itemsize} bytes")
    return meta


class ActivationCache:
    """A harvested cache folder (see the module docstring). `max_tokens` limits the view to the
    first tokens (a bigger cache built for an earlier, longer run serves a shorter one)."""

    def __init__(self, path, max_tokens: int | None = None):
        self.path = Path(path)
        self.meta = read_meta(self.path)
        self.layers: list[int] = list(self.meta["layers"])
        self.d: int = int(self.meta["d"])
        self.n_tokens: int = int(self.meta["n_tokens"]) if max_tokens is None else min(int(self.meta["n_tokens"]), max_tokens)
        self.scale: Tensor = torch.tensor(self.meta["scale"], dtype=torch.float32)
        self.shard_tokens: int = int(self.meta["shard_tokens"])
        self.dtype = DTYPES[self.meta["dtype"]]
        self._shards = [np.memmap(self.path / name, dtype=self.dtype, mode="r", shape=(n, len(self.layers), self.d))
                        for name, n in self.meta["shards"]]

    def __len__(self) -> int:
        return self.n_tokens

    def check(self, model_name: str, layers) -> None:
        """ValueError if the cache was made for another model or other layers."""
        if self.meta["model"] != model_name or list(self.layers) != list(layers):
            raise ValueError(f"cache {str(self.path)!r} holds model {self.meta['model']!r} layers {self.layers}, "
                             f"but model {model_name!r} layers {list(layers)} were asked for")

    def read(self, start: int, stop: int) -> Tensor:
        """Raw (unscaled) float32 activations of tokens [start, stop): (N, L, d)."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise ValueError(f"token range [{start}, {stop}) outside the cache's [0, {self.n_tokens})")
        if start == stop:
            return torch.empty(0, len(self.layers), self.d)
        S = self.shard_tokens
        parts = [np.asarray(self._shards[i][max(start, i * S) - i * S:min(stop, (i + 1) * S) - i * S], dtype=np.float32)
                 for i in range(start // S, (stop - 1) // S + 1)]
        return torch.from_numpy(np.concatenate(parts))

    def take(self, idx: Tensor, as_stored: bool = False, pin_memory: bool = False) -> Tensor:
        """Raw activations of arbitrary token indices, in the order given: (len(idx), L, d), float32
        or, with as_stored, the cache's own dtype (half the bytes to move; convert on the device).
        pin_memory: in page-locked memory, so that .to(cuda, non_blocking=True) is asynchronous."""
        idx = torch.as_tensor(idx, dtype=torch.long)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_tokens):
            raise ValueError(f"token indices must lie in [0, {self.n_tokens}), got {idx.min().item()}..{idx.max().item()}")
        dtype = torch.from_numpy(np.empty(0, self.dtype)).dtype if as_stored else torch.float32
        out = torch.empty((len(idx), len(self.layers), self.d), dtype=dtype, pin_memory=pin_memory)
        out_np = out.numpy()
        order = idx.argsort().numpy()                  # read each shard in ascending order
        sorted_idx = idx.numpy()[order]
        shard_of = sorted_idx // self.shard_tokens
        for i in np.unique(shard_of):
            sel = shard_of == i
            out_np[order[sel]] = self._shards[i][sorted_idx[sel] - i * self.shard_tokens]
        return out

    def batches(self, batch_size: int, start_token: int = 0, stop_token: int | None = None, shuffle: bool = True,
                seed: int = 0, scaled: bool = True, skip: int = 0, drop_last: bool = False) -> Iterator[Tensor]:
        """(B, L, d) float32 batches over tokens [start_token, stop_token), one pass.

        shuffle=True visits the tokens in the order of torch.randperm(n, Generator().manual_seed(seed)),
        so the sequence of batches is a function of (seed, start_token, stop_token, batch_size) only.
        To resume exactly after s batches, call again with the same arguments and skip=s (the
        skipped batches are not read). scaled=True multiplies layer l by scale[l]."""
        stop_token = self.n_tokens if stop_token is None else stop_token
        if not 0 <= start_token <= stop_token <= self.n_tokens:
            raise ValueError(f"token range [{start_token}, {stop_token}) outside the cache's [0, {self.n_tokens})")
        n = stop_token - start_token
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        n_batches = n // batch_size if drop_last else math.ceil(n / batch_size)
        for b in range(skip, n_batches):
            lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
            x = (self.take(order[lo:hi] + start_token) if shuffle
                 else self.read(start_token + lo, start_token + hi))
            yield x * self.scale[:, None] if scaled else x


def _settings(model_name, layers_spec, multi, dataset, split, context, dtype, drop_outliers, lm_dtype) -> dict:
    return {"model": model_name, "layers_spec": None if layers_spec is None else str(layers_spec),
            "multi": multi, "dataset": dataset, "split": split, "context": context, "dtype": dtype,
            "drop_outliers": drop_outliers, "lm_dtype": lm_dtype, "version": VERSION}


def default_cache_path(model_name, layers, multi, dataset, split, context, dtype, drop_outliers,
                       lm_dtype="float32") -> Path:
    """$FMX_CACHE/acts/<model>-<hash of the settings>: same settings, same folder."""
    key = json.dumps(_settings(model_name, layers, multi, dataset, split, context, dtype, drop_outliers,
                               lm_dtype), sort_keys=True)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(str(model_name)).name)
    return activations.cache_root() / "acts" / f"{slug}-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def check_folder(path: Path) -> None:
    """ValueError unless `path` can be a cache folder: not a file, and creatable or writable."""
    from support.cli import check_writable

    if path.exists() and not path.is_dir():
        raise ValueError(f"--cache {str(path)!r} is a file: pass a folder for the activation cache (or none to stream)")
    check_writable(path, "the activation cache")


def build_cache(path, model_name: str = activations.DEFAULT_MODEL, layers=None, dataset: str | None = None,
                n_tokens: int = 1_000_000, context: int = 128, batch_size: int = 16, device="cpu",
                dtype: str = "float16", drop_outliers: float | None = None, multi: bool = True,
                split: str = "train", model=None, tokenizer=None, lm_dtype: str = "float32") -> ActivationCache:
    """Harvest `n_tokens` tokens into a cache folder and open it; reuse a complete matching one.

    path None → default_cache_path(...). layers: anything activations.parse_layers takes (None → the
    default for `multi`). An existing cache is reused when model, layers, dataset, split, context,
    dtype, drop_outliers and lm_dtype (the LM's weights, see activations.load_lm) match and it holds ≥ n_tokens
    (or the corpus ran out); it is rebuilt when it holds too few; ValueError when it was made with
    other settings, or when it is damaged (see read_meta).
    An already loaded (model, tokenizer) for `model_name` in `lm_dtype` may be passed to skip loading."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if lm_dtype not in activations.LM_DTYPES:
        raise ValueError(f"lm_dtype must be one of {list(activations.LM_DTYPES)}, got {lm_dtype!r}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    path = Path(path) if path is not None else default_cache_path(
        model_name, layers, multi, dataset, split, context, dtype, drop_outliers, lm_dtype)
    check_folder(path)
    remove_stale(path.parent, path.name)     # what a killed harvest left (.<name>.tmp-<pid>), reused or not
    if path.parent == activations.cache_root() / "acts":
        remove_stale(path.parent)            # and any other cache's there (that folder holds caches only)
    if (path / "meta.json").exists():
        cache = ActivationCache(path)
        m = cache.meta
        if m["model"] != model_name:
            raise ValueError(f"cache {str(path)!r} holds model {m['model']!r} layers {m['layers']}, but model "
                             f"{model_name!r} layers {layers if layers is not None else 'default'} were asked for")
        cache.check(model_name, activations.parse_layers(layers, m["n_blocks"], multi))
        want = {"dataset": dataset, "split": split, "context": context, "dtype": dtype,
                "drop_outliers": drop_outliers, "lm_dtype": lm_dtype, "version": VERSION}
        have = {"lm_dtype": "float32", **m}               # caches from before lm_dtype was recorded
        diff = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
        if diff:
            raise ValueError(f"cache {str(path)!r} was made with other settings (cached, asked): {diff}; "
                             f"delete it or choose another cache path")
        if cache.n_tokens >= n_tokens or m.get("exhausted"):
            return ActivationCache(path, max_tokens=n_tokens)
        print(f"cache {path} holds {cache.n_tokens:,} tokens, {n_tokens:,} asked for: rebuilding it")
    elif path.exists() and any(path.iterdir()):
        raise ValueError(f"cache path {str(path)!r} exists but is not an activation cache (no meta.json)")

    # before the LM's weights are loaded: the dataset (a token file whole, in its vocabulary), the disk space
    tokenizer = tokenizer or activations.load_tokenizer(model_name)
    check_dataset(dataset, tokenizer, split)
    lm = model.config.get_text_config() if model is not None else activations.lm_config(model_name)
    layer_list = activations.parse_layers(layers, lm.num_hidden_layers, multi)
    known = len(token_file(dataset, tokenizer)) if is_token_corpus(dataset) else None
    if known is not None and n_tokens > known:        # a pre-tokenised corpus: its size is known up front
        print(f"note: the corpus {dataset!r} holds {known:,} tokens, fewer than the {n_tokens:,} asked for: caching "
              f"all of them")
        n_tokens = known
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    check_free(path.parent, n_tokens * len(layer_list) * lm.hidden_size * itemsize, f"the activation cache "
               f"({n_tokens:,} tokens × {len(layer_list)} layers × {lm.hidden_size} × {itemsize} bytes)")
    if model is None:
        model, tokenizer = activations.load_lm(model_name, device=device, dtype=lm_dtype)
    paths = activations.block_paths(model)
    _write_cache(path, model, layer_list, paths, dataset_batches(tokenizer, dataset, split, context, batch_size),
                 n_tokens, context, device, dtype, drop_outliers,
                 {"model": model_name, "dataset": dataset, "split": split, "lm_dtype": lm_dtype})
    return ActivationCache(path, max_tokens=n_tokens)


def new_shard(path: Path, dtype, shape: tuple) -> np.memmap:
    """A shard file with all its blocks allocated before it is mapped: a full disk is then an error here
    (DiskFull naming the file), never a SIGBUS when a page of the map is written back later."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise disk_full(path, size) from None
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):   # a filesystem without fallocate
                raise
            f.truncate(size)
    return np.memmap(path, dtype=dtype, mode="r+", shape=shape)


def _write_cache(path: Path, model, layers, paths, batches, n_tokens, context, device, dtype, drop_outliers,
                 info: dict) -> None:
    from tqdm import tqdm

    np_dtype, d = DTYPES[dtype], model.config.get_text_config().hidden_size
    row_bytes = len(layers) * d * np.dtype(np_dtype).itemsize
    shard_tokens = max(1, SHARD_BYTES // row_bytes)
    tmp = temp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards, shard, filled, done = [], None, 0, 0
    sq_sum, sq_n = torch.zeros(len(layers), dtype=torch.float64), 0
    t0 = time.time()
    bar = tqdm(total=n_tokens, desc=f"activations.harvest {Path(str(info['model'])).name} layers {layers}",
               unit="tok", unit_scale=True, dynamic_ncols=True)
    try:
        for x in activations.harvest_batches(model, batches, layers, device, drop_outliers, n_tokens):
            if sq_n < activations.SCALE_TOKENS:                       # the scale: first activations.SCALE_TOKENS tokens
                part = x[:activations.SCALE_TOKENS - sq_n].double()
                sq_sum += part.pow(2).sum(-1).sum(0)
                sq_n += len(part)
            xs = x.numpy().astype(np_dtype)
            if not np.isfinite(xs).all():
                raise ValueError(f"activations overflow {dtype} (max |x| = {x.abs().max().item():.3g}): "
                                 f"use dtype='float32'")
            while len(xs):
                if shard is None:
                    name = f"acts_{len(shards):05d}.bin"
                    size = min(shard_tokens, n_tokens - done)
                    shard, filled = new_shard(tmp / name, np_dtype, (size, len(layers), d)), 0
                    shards.append([name, size])
                k = min(len(xs), len(shard) - filled)
                shard[filled:filled + k] = xs[:k]
                filled, done, xs = filled + k, done + k, xs[k:]
                if filled == len(shard):
                    shard.flush()
                    shard = None
            bar.update(len(x))
        bar.close()
        if shard is not None:                             # the corpus ran out mid-shard: truncate
            shard.flush()
            del shard
            shards[-1][1] = filled
            os.truncate(tmp / shards[-1][0], filled * len(layers) * d * np.dtype(np_dtype).itemsize)
        if done == 0:
            raise ValueError(f"the corpus {info['dataset']!r} gave no tokens")
        seconds = time.time() - t0
        meta = {**info, "n_blocks": len(paths), "layers": layers, "hooks": [paths[l] for l in layers],
                "d": d, "dtype": dtype, "n_tokens": done, "exhausted": done < n_tokens, "context": context,
                "drop_outliers": drop_outliers, "scale": (d / (sq_sum / sq_n)).sqrt().tolist(),
                "scale_tokens": sq_n, "shard_tokens": shard_tokens, "shards": shards,
                "tokens_per_s": done / max(seconds, 1e-9), "seconds": seconds, "version": VERSION,
                "torch": torch.__version__, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_meta(tmp, meta)
        old = None
        if path.exists():                                 # replace an incomplete/too-small cache
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        print(f"cached {done:,} tokens × {len(layers)} layers × {d} in {path} ({meta['tokens_per_s']:,.0f} tokens/s)")
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)

