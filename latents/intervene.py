"""Intervening with a latent: ablate it or steer with it, and see what the language model does differently.

    python -m latents.intervene RUN --latent 524 --steer 20 --prompt "The meeting will take place in"   # every layer
    python -m latents.intervene RUN --latent 524 --steer 20 --layers 11 --prompt "The meeting will take place in"
    python -m latents.intervene RUN --latent 524 --ablate --prompt "She moved from Berlin to"

prints the latent's activations on the prompt, the change of the next-token distribution (KL, the tokens
promoted and suppressed) and a greedy continuation with and without the intervention. From Python:

    lm, tok, entries = intervene.load("runs/cc")
    r = intervene.compare(lm, tok, entries, "The meeting will take place in", intervene.Intervention([524], steer=20.0))
    print(intervene.format_report(r))       # r: a dict (KL, promoted / suppressed tokens, continuations)

Units. Block l of the LM outputs h_l (raw residual stream, activations.py); a dictionary reads
x_l = s_l · h_l (s_l = config.input_scale) and writes x̂ = decode(z), z = encode(x). Whatever is added to
the stream is in raw units: a decoder vector d_il (dictionary units) adds d_il / s_l. A folded dictionary
(train.py --fold-scale: s_l = 1, weights divided by s_l) therefore intervenes identically.

What is done, at the chosen layers S (`--layers`; default every layer the dictionary reads: all L for a
crosscoder or fmxcoder, the one of an SAE or PolySAE; for a per-layer SAE set the SAE of each chosen layer,
where latent i means latent i of each of those SAEs), for the chosen latents A (`--latent 3` or `3,7`). First
the edit e_l of each layer l ∈ S, in raw units:

  ablate   e_l = (decode(z')_l − decode(z)_l) / s_l,   z = encode(x) the latents of the clean pass, z' = z with
           z_i = 0 for i ∈ A; then  h_l + e_l = x̂'_l / s_l + (h_l − x̂_l / s_l): the reconstruction without A
           plus the reconstruction error, so ablating nothing is exactly the clean forward pass.
           Linear decoders (SAE, crosscoder, fmxcoder): e_l = −Σ_{i∈A} z_i d_il / s_l.  PolySAE: the
           polynomial decoder with z_i = 0, so every term of i goes (linear, and its quadratic and cubic
           interactions with the other active latents).
  steer    e_l = α Σ_{i∈A} d_il / s_l.  α is an activation in the dictionary's units (the report gives the
           latent's own activations on the prompt, and the norm of the edit relative to the stream's).
           PolySAE: d_i is the linear decoder direction D1[i] = (U C1ᵀ)[i] (decoder_vectors); its polynomial
           terms are not added.

Then what is added at each layer, for the layers l_1 < l_2 < ... of S that one multi-layer dictionary edits.
A crosscoder's x̂_l reconstructs the residual stream at layer l, the state after block l, and the stream
carries whatever was added at l_1 on to l_2 (h_l2 = h_l1 + what blocks l_1+1..l_2 add, their response to the
edit included). So, by default, block l_1 outputs h_l1 + e_l1 and each later block l_k outputs
h_lk + (e_lk − e_lk−1): the edits' own chain holds exactly e_l at each l ∈ S, and the stream there is

    h_l(clean) + e_l + R_l          R_l: what the blocks between changed in response to the earlier edits

(ablating at every layer: x̂'_l / s_l + the clean error + R_l). With `--cumulative`, every block l ∈ S adds the
whole e_l on top of what the stream carries, which then holds Σ_{l' ∈ S, l' ≤ l} e_l' at l: for a latent whose
decoder vectors point alike at all its layers (the usual crosscoder latent) that is up to L times the edit
at the last layer, the intervention "add α d_il at every layer" read literally. Single-layer dictionaries
(an SAE, a PolySAE, each SAE of a per-layer set) add their e_l whole in both modes.

Edits apply at the real tokens of the sequence (keep: not BOS nor any special token, which keep their
activation, as in metrics.py's spliced LM loss), at every position: the prompt's and the generated ones.

How the pass runs. One forward pass with a hook at each block of S that adds that layer's share as the pass
goes through it, so h_l at a later layer of S is the stream the model actually produced there, already
carrying the earlier edits and the blocks' response to them (R_l). The edits themselves are fixed before that
pass: steering adds constants; ablation uses the latents z of a clean forward pass of the same tokens, at
every layer. A crosscoder's z reads all its layers at once, the later ones not yet computed when block l
runs, so it cannot be re-encoded as the pass goes; for one rule across kinds, per-layer SAEs are not
re-encoded either (unlike SAELens's hooked SAEs, where a later SAE encodes the already-edited stream). So the
reconstruction x̂_l subtracted at a later layer is that of the clean stream, and what is kept as the "error"
there holds R_l too.

Cost: a clean pass, then the blocks after min(S) only (activations.logits_from_block replays blocks
0..min(S) from the clean pass, as metrics.py does). Greedy continuation with KV caches, one token a step:
steering one intervened pass a token; ablation also a clean pass of that token (its latents), with a cache
of the clean model over the same, intervened, sequence.

The report, at the prompt's last token: p the clean next-token distribution, q the intervened one,
    KL(p || q) = Σ_v p_v (log p_v − log q_v)   (nats; also its mean over the prompt's real positions)
    promoted: the tokens with the largest q_v − p_v, suppressed: the smallest, each with p_v, q_v and
    log q_v − log p_v (a ranking by that log ratio, i.e. by the logit change, would list tokens that stay
    improbable: on SmolLM2 a steer's largest log ratios are tokens like '<filename>' at q < 1e-3)

`top_context_effects` is latents/features.py's `--intervene`: each latent ablated in its top contexts.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

import activations
import core
from core import opt
from support import cli, corpora, saved


@dataclass
class Intervention:
    """What is done: ablate the latents, or steer with them, at some of the dictionary's layers (`layers`: what
    activations.parse_layers reads, "11-14" or [11, 18], or None)."""
    latent: list[int] | None = opt(None, "the latent(s) to intervene with: 524, or 3,7 (several at once)")
    ablate: bool = opt(False, "zero the latent(s) in the reconstruction, the reconstruction error kept")
    steer: float | None = opt(None, "add ALPHA x the decoder vector(s) (raw units) instead")
    layers: str | None = opt(None, "LM blocks to intervene at: 15, 11-14, 11,18, or unset: every layer the "
                                   "dictionary reads (a per-layer set of several SAEs needs it)")
    cumulative: bool = opt(False, "a multi-layer dictionary: add the whole edit at every chosen layer, on top of "
                                  "what the stream carries from the earlier ones; otherwise only the change from the "
                                  "previous chosen layer's, so that the stream at layer l holds the edit of layer l")

    def __post_init__(self):
        self.check()
        self.latent = [self.latent] if isinstance(self.latent, int) else list(self.latent)

    def check(self, name=str) -> None:
        lat = [self.latent] if isinstance(self.latent, int) and not isinstance(self.latent, bool) else self.latent
        if (not isinstance(lat, (list, tuple)) or not lat
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in lat)):
            raise ValueError(f"{name('latent')} must be one or more latent indices >= 0 like 524 or 3,7, got "
                             f"{self.latent!r}")
        if len(set(lat)) != len(lat):
            raise ValueError(f"{name('latent')} must not repeat a latent, got {self.latent!r}")
        if bool(self.ablate) == (self.steer is not None):
            raise ValueError(f"pass either {name('ablate')} or {name('steer')} ALPHA (exactly one), got "
                             f"ablate={self.ablate}, steer={self.steer}")
        if self.steer is not None and not (isinstance(self.steer, (int, float)) and abs(self.steer) < float("inf")):
            raise ValueError(f"{name('steer')} must be a finite number, got {self.steer!r}")

    def describe(self) -> str:
        what = "ablate" if self.ablate else f"steer α = {self.steer:g} with"
        return f"{what} latent{'s' * (len(self.latent) > 1)} {','.join(map(str, self.latent))}"


@dataclass
class InterveneConfig:
    """The other flags of `python -m latents.intervene` (the intervention's are Intervention's)."""
    prompt: str = opt("The capital of France is", "the text the model continues")
    tokens: int = opt(20, "greedy continuation length (0: none)")
    top: int = opt(10, "promoted and suppressed tokens shown")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    allow_incomplete: bool = opt(False, "use a run whose training was interrupted")

    def __post_init__(self):
        self.check()

    def check(self, name=str) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"{name('prompt')} must be a non-empty text, got {self.prompt!r}")
        cli.check_min((name("tokens"), self.tokens, 0), (name("top"), self.top, 1))


class Target(NamedTuple):
    """One dictionary intervened with: it reads blocks `layers`, and is edited at blocks `at` ⊆ layers."""
    model: torch.nn.Module
    layers: list[int]
    at: list[int]


# ----------------------------------------------------------------------------------------
# The edits and the edited forward pass
# ----------------------------------------------------------------------------------------


def targets(entries, layers=None) -> list[Target]:
    """The dictionaries of a run (saved.open_run's [(layers, model, meta)]) to edit at `layers` (a spec of
    activations.parse_layers, or None: every layer of a single dictionary)."""
    readable = sorted({l for ls, _, _ in entries for l in ls})
    if layers is None:
        if len(entries) > 1:
            raise ValueError(f"this run is a per-layer set of {len(entries)} dictionaries (layers "
                             f"{', '.join(map(str, readable))}): pass --layers to say which one(s) to intervene with")
        chosen = readable
    elif isinstance(layers, str) and layers.strip().lower() == "all":
        chosen = readable
    else:
        try:
            chosen = activations.parse_layers(layers, 1 << 30, True)
        except ValueError as e:                         # a negative block: said as one not read, below
            if "out of range" not in str(e):
                raise
            chosen = [-1]
    bad = [l for l in chosen if l not in readable]
    if bad:
        raise ValueError(f"--layers: the run's dictionaries read blocks {', '.join(map(str, readable))}, "
                         f"not {layers if bad[0] < 0 else bad[0]}")
    out = [Target(m, ls, [l for l in ls if l in chosen]) for ls, m, _ in entries]
    return [t for t in out if t.at]


def check_latents(tg: list[Target], latents: list[int]) -> None:
    for t in tg:
        n = t.model.config.n_latents
        if max(latents) >= n:
            raise ValueError(f"--latent {max(latents)} does not exist: the dictionary has {n} latents (0-{n - 1})")


def hidden(out) -> Tensor:
    """The hidden state of a block output (a tensor, or a tuple whose first entry is it)."""
    return out[0] if isinstance(out, tuple) else out


def dictionary_input(t: Target, outs: dict, keep: Tensor) -> Tensor:
    """What the dictionary reads at the real tokens: s_l · h_l, (N, L, d) (crosscoders) or (N, d)."""
    s_L = torch.tensor(t.model.config.input_scale, dtype=torch.float32, device=keep.device)
    x = torch.stack([hidden(outs[l])[keep].float() for l in t.layers], 1) * s_L[:, None]
    return x if core.is_multilayer(t.model) else x[:, 0]


@torch.no_grad()
def ablation_delta(model, x: Tensor, drop_NF: Tensor) -> Tensor:
    """decode(z') − decode(z) (N, L, d) in the dictionary's units, z = encode(x) (x (N, L, d) or (N, d)), z' = z
    with the entries where drop_NF (N, F) or (F,) is True set to 0 (for a linear decoder −Σ z_i d_i)."""
    z = model.encode(x)
    diff = model.decode_nobias(z.masked_fill(drop_NF, 0)) - model.decode_nobias(z)
    return diff if diff.ndim == 3 else diff[:, None]


def increments(e: dict[int, Tensor]) -> dict[int, Tensor]:
    """{l: e_l − e_l'} (l' the previous layer of e; the first layer's e whole): added at each layer, these make
    the edits' own chain hold exactly e_l at layer l, since the residual stream carries every earlier addition
    forward (h_l = h_l' + the blocks between, which add their response to it on top)."""
    ls = sorted(e)
    return {l: e[l] - e[prev] if prev is not None else e[l] for prev, l in zip([None] + ls[:-1], ls)}


@torch.no_grad()
def layer_edits(tg: list[Target], outs: dict, keep: Tensor, iv: Intervention) -> dict[int, Tensor]:
    """{block l: what is added to its output at the real tokens, raw units: (N, d) per token or (d,)},
    for the intervention `iv` and the clean pass's block outputs `outs` (see the module docstring)."""
    edits = {}
    for t in tg:
        s_L = t.model.config.input_scale
        if iv.steer is not None:
            d = t.model.decoder_vectors().detach()[iv.latent].sum(0).float()
            d_LD = d if d.ndim == 2 else d[None]
            whole = {l: iv.steer * d_LD[t.layers.index(l)].to(keep.device) / s_L[t.layers.index(l)] for l in t.at}
        else:
            drop_F = torch.zeros(t.model.config.n_latents, dtype=torch.bool, device=keep.device)
            drop_F[iv.latent] = True
            diff_NLD = ablation_delta(t.model, dictionary_input(t, outs, keep), drop_F)
            whole = {l: diff_NLD[:, t.layers.index(l)] / s_L[t.layers.index(l)] for l in t.at}
        edits.update(whole if iv.cumulative else increments(whole))
    return edits


@torch.no_grad()
def edited_logits(lm, batch: dict, outs: dict | None, edits: dict[int, Tensor], past_key_values=None) -> Tensor:
    """The logits (B, T, V) when block l's output gets edits[l] added at the real tokens (batch["keep"]), for
    every l in edits, applied as the forward pass goes through: a forward hook at each edited block
    (activations.spliced). With the clean block outputs `outs`, blocks 0..min(edits) are not run but replayed
    from them (activations.logits_from_block); without, the whole pass runs, continuing `past_key_values` (a
    transformers Cache, updated) if given."""
    dev = next(lm.parameters()).device
    keep = batch["keep"].to(dev)
    first, *later = sorted(edits)
    add = lambda l: (lambda h: h + edits[l].to(h.device))              # noqa: E731  (float; spliced casts back)
    blocks, paths = dict(lm.named_modules()), activations.block_paths(lm)
    handles = [blocks[paths[l]].register_forward_hook(
        lambda m, args, out, l=l: activations.spliced(out, keep, add(l))) for l in (later if outs else edits)]
    try:
        if outs:
            return activations.logits_from_block(lm, batch, first, activations.spliced(outs[first], keep, add(first)))
        return lm(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                  **activations.cache_kwargs(lm, past_key_values)).logits
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def intervened(lm, batch: dict, tg: list[Target], iv: Intervention) -> tuple[Tensor, Tensor, dict, dict]:
    """One batch: (clean logits, intervened logits, the clean block outputs, the edits), logits (B, T, V)."""
    layers = sorted({l for t in tg for l in t.layers})
    clean, outs = activations.block_outputs(lm, batch, layers)
    edits = layer_edits(tg, outs, batch["keep"].to(clean.device), iv)
    return clean, edited_logits(lm, batch, outs, edits), outs, edits


# ----------------------------------------------------------------------------------------
# The report: next-token change, continuations
# ----------------------------------------------------------------------------------------


def prompt_batch(tok, ids: list[int]) -> dict:
    """One row [ids] as a collated batch (input_ids, attention_mask, keep), as corpora builds windows."""
    t = torch.tensor([ids], dtype=torch.long)
    return corpora.batch_of(tok, t, torch.ones_like(t))


def prompt_ids(tok, prompt: str) -> list[int]:
    """BOS + the prompt's tokens, as every training window starts (corpora.windows)."""
    return [corpora.bos_id(tok)] + tok(prompt, add_special_tokens=False)["input_ids"]


def kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(softmax p || softmax q) over the last dimension, in nats (float64)."""
    lp, lq = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def next_token_change(clean_V: Tensor, edited_V: Tensor, top: int) -> dict:
    """KL(p || q) and the `top` tokens with the largest and smallest q − p, each [token id, p, q,
    log q − log p], for one position's logits (V,)."""
    lp, lq = clean_V.double().log_softmax(-1), edited_V.double().log_softmax(-1)
    gain = lq.exp() - lp.exp()
    row = lambda i: [int(i), lp[i].exp().item(), lq[i].exp().item(), (lq[i] - lp[i]).item()]  # noqa: E731
    return {"kl": kl(clean_V, edited_V).item(),
            "promoted": [row(i) for i in gain.topk(top).indices],
            "suppressed": [row(i) for i in gain.topk(top, largest=False).indices]}


@torch.no_grad()
def greedy(lm, tok, ids: list[int], n: int, tg: list[Target] | None = None, iv: Intervention | None = None) -> list[int]:
    """The n greedily chosen next tokens (fewer if EOS comes), intervened by `iv` if given. KV caches: the
    prompt once, then one token a step; ablation keeps a second one, of the clean pass over the same (intervened)
    sequence, whose latents it needs; each new token is edited as the prompt's tokens were."""
    from transformers import DynamicCache

    new, chunk = [], list(ids)
    clean_cache, edit_cache = DynamicCache(), DynamicCache()
    layers = sorted({l for t in tg for l in t.layers}) if iv is not None else [0]
    for _ in range(n):
        batch = prompt_batch(tok, chunk)
        batch["attention_mask"] = torch.ones(1, len(ids) + len(new), dtype=torch.long)   # the cached tokens too
        if iv is None or iv.ablate:
            logits, outs = activations.block_outputs(lm, batch, layers, past_key_values=clean_cache)
        if iv is not None:
            keep = batch["keep"].to(next(lm.parameters()).device)
            edits = layer_edits(tg, outs if iv.ablate else {}, keep, iv)
            logits = edited_logits(lm, batch, None, edits, past_key_values=edit_cache)
        nxt = int(logits[0, -1].argmax())
        new.append(nxt)
        chunk = [nxt]
        if nxt == tok.eos_token_id:
            break
    return new


@torch.no_grad()
def compare(lm, tok, entries, prompt: str, iv: Intervention, n_tokens: int = 20, top: int = 10) -> dict:
    """The report of `iv` on `prompt` (see the module docstring) as a dict; `entries` = saved.open_run(RUN)."""
    tg = targets(entries, iv.layers)
    check_latents(tg, iv.latent)
    ids = prompt_ids(tok, prompt)
    batch = prompt_batch(tok, ids)
    clean, edited, outs, edits = intervened(lm, batch, tg, iv)
    keep = batch["keep"][0].to(clean.device)
    acts, strength = [], {}
    for t in tg:
        z = t.model.encode(dictionary_input(t, outs, keep[None]))[:, iv.latent]                 # (N, A)
        pos = keep.nonzero()[:, 0].tolist()
        acts.append({"layers": t.layers, "at": t.at, "tokens": [
            [tok.decode([ids[p]]), [round(v, 4) for v in z[n].tolist()]] for n, p in enumerate(pos)]})
    if iv.steer is not None:       # ‖what the edits' chain holds at l‖ / mean ‖h_l‖ over the prompt's real tokens
        held = torch.stack([edits[l] for l in sorted(edits)]).cumsum(0)
        strength = {l: (held[n].norm() / hidden(outs[l])[0, keep].float().norm(dim=-1).mean()).item()
                    for n, l in enumerate(sorted(edits))}
    change = next_token_change(clean[0, -1], edited[0, -1], top)
    per_pos = kl(clean[0, keep], edited[0, keep])
    report = {"prompt": prompt, "intervention": iv.describe(), "layers": sorted(edits), "acts": acts,
              "relative_norm": strength, **change, "kl_mean_prompt": per_pos.mean().item(), "tokens": n_tokens}
    if n_tokens:
        report["clean"] = tok.decode(greedy(lm, tok, ids, n_tokens))
        report["intervened"] = tok.decode(greedy(lm, tok, ids, n_tokens, tg, iv))
    report["names"] = {i: tok.decode([i]) for i, *_ in change["promoted"] + change["suppressed"]}
    return report


def format_report(r: dict) -> str:
    """The report as text (what the command line prints)."""
    show = repr
    text = lambda s: s.replace("\n", "↵")  # noqa: E731
    out = [f"{r['intervention']} at block{'s' * (len(r['layers']) > 1)} {', '.join(map(str, r['layers']))}"]
    if r["relative_norm"]:
        norms = " ".join(f"{v:.2f}" for _, v in sorted(r["relative_norm"].items()))
        out.append(f"  norm of the edit the stream holds / its mean norm on the prompt, per block: {norms}")
    for a in r["acts"]:
        fired = [f"{show(t)} {'/'.join(f'{v:.3g}' for v in vs)}" for t, vs in a["tokens"] if any(v > 0 for v in vs)]
        where = f"layers {a['layers'][0]}-{a['layers'][-1]}" if len(a["layers"]) > 1 else f"layer {a['layers'][0]}"
        out.append(f"  activation on the prompt ({where}, clean): " + (", ".join(fired) if fired else "none (it does "
                                                                         "not fire on this prompt)"))
    out.append(f"next token after {r['prompt']!r}: KL(clean || intervened) = {r['kl']:.4f} nats "
               f"(mean over the prompt's positions {r['kl_mean_prompt']:.4f})")
    for key in ("promoted", "suppressed"):
        cells = [f"{show(r['names'][i])} {p:.3f}→{q:.3f}" for i, p, q, _ in r[key]]
        out.append(f"  {key + ':':<11} " + ", ".join(cells))
    if r["tokens"]:
        out.append(f"greedy continuation ({r['tokens']} tokens):")
        out.append(f"  clean:      {text(r['prompt'])}|{text(r['clean'])}")
        out.append(f"  intervened: {text(r['prompt'])}|{text(r['intervened'])}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------
# For latents/features.py --intervene: each latent ablated in its top contexts
# ----------------------------------------------------------------------------------------


@torch.no_grad()
def top_context_effects(lm, tok, layers: list[int], model, ids_FKW: Tensor, key_FK: Tensor, peak: int,
                        contexts: int, n: int, rows_per_batch: int = 32, progress: bool = False) -> dict[int, dict]:
    """{latent f: {"promoted", "suppressed": [[token id, mean p_clean − p_ablated]] (n each), "kl", "contexts"}}:
    latent f ablated (the module docstring's ablation, at all the dictionary's layers and every real token) in
    its first `contexts` top contexts (ids (F, K, W) of features.py's snippets, the peak at index `peak`, −1
    outside the window), each cut at the peak (BOS + the tokens up to it), read at the peak, the prediction of
    the next token: the mean over the contexts of p_clean − p_ablated (> 0: the latent makes the token more
    likely there; ranked by probability, as `next_token_change`) and of KL(clean || ablated). Latents without
    top contexts get no entry."""
    from tqdm import tqdm

    dev = next(lm.parameters()).device
    tg = [Target(model, layers, layers)]
    bos, pad = corpora.bos_id(tok), tok.pad_token_id
    rows, owner = [], []
    filled_FK = (key_FK[:, :contexts] > -float("inf")).cpu().tolist()
    prefix_FKW = ids_FKW[:, :contexts, :peak + 1].cpu().tolist()
    for f, (filled_K, prefix_KW) in enumerate(zip(filled_FK, prefix_FKW)):
        for ok, prefix in zip(filled_K, prefix_KW):
            if not ok:
                continue
            r = [i for i in prefix if i >= 0]
            rows.append(r if r[0] == bos else [bos] + r)
            owner.append(f)
    out: dict[int, dict] = {}
    sums: dict[int, list] = {}
    for lo in tqdm(range(0, len(rows), rows_per_batch), desc="ablation in the top contexts", unit="batch",
                   disable=not progress, dynamic_ncols=True):
        chunk, who = rows[lo:lo + rows_per_batch], owner[lo:lo + rows_per_batch]
        T = max(map(len, chunk))
        ids = torch.full((len(chunk), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, r in enumerate(chunk):
            ids[b, :len(r)], mask[b, :len(r)] = torch.tensor(r), 1
        batch = corpora.batch_of(tok, ids, mask)
        clean, outs = activations.block_outputs(lm, batch, layers)
        keep = batch["keep"].to(dev)
        drop = torch.zeros(len(chunk), model.config.n_latents, dtype=torch.bool, device=dev)
        drop[torch.arange(len(chunk), device=dev), torch.tensor(who, device=dev)] = True
        row_N = keep.nonzero()[:, 0]
        diff_NLD = ablation_delta(model, dictionary_input(tg[0], outs, keep), drop[row_N])
        s_L = model.config.input_scale
        edits = increments({l: diff_NLD[:, j] / s_L[j] for j, l in enumerate(layers)})
        edited = edited_logits(lm, batch, outs, edits)
        last = mask.sum(1).to(dev) - 1
        at = torch.arange(len(chunk), device=dev)
        c, e = clean[at, last].double(), edited[at, last].double()
        drop_BV = c.softmax(-1) - e.softmax(-1)
        kl_B = kl(c, e)
        for b, f in enumerate(who):
            s = sums.setdefault(f, [0, 0.0, 0.0])
            s[0], s[1], s[2] = s[0] + 1, s[1] + drop_BV[b], s[2] + kl_B[b].item()
    for f, (count, total_V, kl_sum) in sums.items():
        mean_V = (total_V / count).float().cpu()
        top, bottom = mean_V.topk(n), mean_V.topk(n, largest=False)
        out[f] = {"promoted": [[int(i), float(f"{v:.4g}")] for v, i in zip(top.values, top.indices)],
                  "suppressed": [[int(i), float(f"{v:.4g}")] for v, i in zip(bottom.values, bottom.indices)],
                  "kl": float(f"{kl_sum / count:.4g}"), "contexts": count}
    return out


# ----------------------------------------------------------------------------------------
# Loading and the command line
# ----------------------------------------------------------------------------------------


def check_not_a_set(run_dir) -> None:
    """A folder of several dictionaries (train.py with several --dict: RUN/<name>/) is refused with their names."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and not saved.dictionary_dirs(run_dir):
        names = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and saved.dictionary_dirs(p))
        if names:
            raise ValueError(f"{str(run_dir)!r} holds a set of {len(names)} dictionaries ({', '.join(names)}): "
                             f"pass one of them, e.g. {str(run_dir / names[0])!r}")


def load(run_dir, device="cpu", allow_incomplete: bool = False):
    """(lm, tokenizer, entries): the run's dictionaries (saved.open_run: one-line errors) and its LM, loaded
    as the run harvested it (run.model, run.lm_dtype)."""
    check_not_a_set(run_dir)
    entries = saved.open_run(run_dir, device, allow_incomplete)
    run = saved.run_entry(run_dir, entries[0][2], ("model",))
    lm, tok = activations.load_lm(run["model"], device=device, dtype=run.get("lm_dtype", "float32"))
    return lm, tok, entries


def main(argv=None) -> int:
    p = cli.ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run folder written by train.py (one dictionary, or a per-layer set)")
    cli.add_flags(p, Intervention, group="the intervention")
    cli.add_flags(p, InterveneConfig)
    try:
        a = p.parse_args(argv)
        if a.latent is None:
            raise ValueError("--latent is required: the latent(s) to intervene with, like --latent 524")
        iv = cli.build(Intervention, **cli.values(a, Intervention))
        c = cli.build(InterveneConfig, **cli.values(a, InterveneConfig))
        device = cli.resolve_device(c.device)
        check_not_a_set(a.run)
        entries = saved.open_run(a.run, device, c.allow_incomplete)
        check_latents(targets(entries, iv.layers), iv.latent)           # before the LM is loaded
        run = saved.run_entry(a.run, entries[0][2], ("model",))
        lm, tok = activations.load_lm(run["model"], device=device, dtype=run.get("lm_dtype", "float32"))
        report = compare(lm, tok, entries, c.prompt, iv, c.tokens, c.top)
    except cli.USER_ERRORS as e:
        return cli.cli_error(e)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
