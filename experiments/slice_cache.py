"""Copy one layer out of a multi-layer activation cache into a single-layer cache (no LM pass).

    python experiments/slice_cache.py SRC_CACHE DST_CACHE LAYER

activation_cache.ActivationCache stores shards of shape (n, L, d) plus meta.json; the copy keeps the
same tokens in the same order (so the held-out region and the outlier-dropping decision, made on
all L layers at harvest time, are the source's), the layer's own scale s_l, and writes shards of
shape (n, 1, d). train.py then accepts it for `--layers LAYER` exactly like a fresh harvest.
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from support import cache as activation_cache  # noqa: E402


def slice_cache(src, dst, layer: int) -> Path:
    src, dst = Path(src), Path(dst)
    cache = activation_cache.ActivationCache(src)
    if layer not in cache.layers:
        raise ValueError(f"layer {layer} is not in the cache {str(src)!r}, which holds layers {cache.layers}")
    if (dst / "meta.json").exists():
        meta = activation_cache.read_meta(dst)
        if meta.get("sliced_from") == str(src) and meta["n_tokens"] == cache.n_tokens and meta["layers"] == [layer]:
            print(f"{dst} already holds layer {layer} of {src}")
            return dst
        raise ValueError(f"{str(dst)!r} already holds another cache; delete it first")
    i = cache.layers.index(layer)
    dst.mkdir(parents=True, exist_ok=True)
    shards = []
    for (name, n), mm in zip(cache.meta["shards"], cache._shards):
        out = np.memmap(dst / name, dtype=cache.dtype, mode="w+", shape=(n, 1, cache.d))
        out[:] = mm[:, i:i + 1]
        out.flush()
        shards.append([name, n])
    meta = dict(cache.meta, layers=[layer], hooks=[cache.meta["hooks"][i]], scale=[cache.meta["scale"][i]],
                shards=shards, shard_tokens=cache.shard_tokens, sliced_from=str(src))
    activation_cache.write_meta(dst, meta)                 # a fresh checksum (meta_sha256) for the sliced metadata
    print(f"wrote layer {layer} of {src} ({cache.n_tokens:,} tokens) to {dst}")
    return dst


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the multi-layer activation cache")
    p.add_argument("dst", help="the single-layer cache to write")
    p.add_argument("layer", type=int, help="the layer to copy")
    a = p.parse_args()
    slice_cache(a.src, a.dst, a.layer)
