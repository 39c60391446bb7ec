"""latents/intervene.py on the tiny random GPT-2 with tiny random dictionaries of the four kinds.

Every edit is checked against what the model's own forward pass shows (hooks that record each block's output
and the next block's input), or against a reference written here: a full forward pass with hooks that apply
the literal definition x̂'/s + (h − x̂/s) with the decoders' weights. Tolerances: 1e-5 absolute on hidden
states and logits of float32 computations that differ only in their order of operations."""
import copy
import json

import pytest
import torch

import activations
import core
from crosscoder import CrossCoder, CrossCoderConfig
from fmxcoder import FMXCoder, FMXCoderConfig
from latents import features, intervene
from polysae import PolySAE, PolySAEConfig
from sae import SAE, SAEConfig
from support import saved

TOL = dict(rtol=0, atol=1e-5)
PROMPT = "The cat sat on the mat and looked at the dog, which was asleep"


def with_bias(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.b_dec.copy_(0.3 * torch.randn(model.b_dec.shape, generator=g))
        model.b_enc.copy_(0.1 * torch.randn(model.b_enc.shape, generator=g))
    return model.eval()


def dictionaries():
    """{kind: (layers, model)}: random dictionaries with input scales far from 1 (a unit slip shows)."""
    torch.manual_seed(0)
    common = dict(d_in=64, n_latents=32, k=4, sparsity="topk")
    return {
        "sae": ([1], with_bias(SAE(SAEConfig(**common, input_scale=[0.7])), 1)),
        "crosscoder": ([0, 1, 2], with_bias(CrossCoder(CrossCoderConfig(**common, n_layers=3,
                                                                         input_scale=[0.5, 1.5, 3.0])), 2)),
        "fmxcoder": ([0, 1, 2], with_bias(FMXCoder(FMXCoderConfig(**common, n_layers=3, rank=16,
                                                                   input_scale=[0.5, 1.5, 3.0])), 3)),
        "polysae": ([1], with_bias(PolySAE(PolySAEConfig(**common, ranks=(32, 8, 8), input_scale=[2.0])), 4)),
    }


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    return activations.load_lm(gpt2_dir)


@pytest.fixture(scope="module")
def dicts():
    return dictionaries()


@pytest.fixture(scope="module")
def prompt(lm):
    _, tok = lm
    ids = intervene.prompt_ids(tok, PROMPT)
    batch = intervene.prompt_batch(tok, ids)
    assert not batch["keep"][0, 0] and batch["keep"][0, 1:].all()          # BOS is not edited
    return ids, batch


def clean_pass(lm, batch, layers):
    logits, outs = activations.block_outputs(lm, batch, layers)
    return logits, outs


def latents_on(model, layers, outs, keep):
    """z (N, F) of the dictionary at the prompt's real tokens, from the clean block outputs."""
    s = torch.tensor(model.config.input_scale)
    x = torch.stack([outs[l][keep] for l in layers], 1) * s[:, None]
    with torch.no_grad():
        return model.encode(x if core.is_multilayer(model) else x[:, 0])


def decoder_of(model, i, j):
    """Latent i's decoder vector at the model's j-th layer, from the weights (not decoder_vectors)."""
    if isinstance(model, SAE):
        return model.W_dec[i].detach()
    if isinstance(model, FMXCoder):                     # what a one-hot z = e_i decodes to, minus b_dec
        e = torch.zeros(1, model.config.n_latents)
        e[0, i] = 1
        return model.decode_nobias(e)[0, j].detach()
    if isinstance(model, CrossCoder):
        return model.W_dec[i, j].detach()
    return (model.U[i] @ model.C1.T).detach()           # PolySAE: the linear term D1[i]


def firing_latent(z):
    """The latent that fires at the most tokens (ties: the lowest index), and a latent that never fires."""
    counts = (z > 0).sum(0)
    return int(counts.argmax()), int((counts == 0).nonzero()[0, 0])


def record_added(lm, run, clean_outs, first):
    """Run `run()` and return {block l: what the next module received − what block l itself produced}, i.e.
    what the intervention added to block l's output; blocks ≤ `first` are replayed from the clean pass."""
    blocks = dict(lm.named_modules())
    paths = activations.block_paths(lm)
    own, seen, handles = {}, {}, []
    nxt = [blocks[p] for p in paths[1:]] + [features.final_norm(lm)]
    for l, p in enumerate(paths):
        handles.append(blocks[p].register_forward_hook(lambda m, a, out, l=l: own.__setitem__(l, out.clone())))
        handles.append(nxt[l].register_forward_pre_hook(
            lambda m, args, kw, l=l: seen.__setitem__(l, (args[0] if args else kw["hidden_states"]).clone()),
            with_kwargs=True))
    try:
        logits = run()
    finally:
        for h in handles:
            h.remove()
    added = {l: seen[l] - (clean_outs[l] if l == first else own[l]) for l in seen if l >= first}
    return logits, added


# ----------------------------------------------------------------------------------------
# Ablation
# ----------------------------------------------------------------------------------------


def expected_additions(whole: dict, chosen: list[int], cumulative: bool) -> dict:
    """What the hook at each chosen layer adds: the whole edit (cumulative), or its change from the previous
    chosen layer's (the default), written out."""
    return {l: whole[l] if cumulative or n == 0 else whole[l] - whole[chosen[n - 1]] for n, l in enumerate(chosen)}


@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("kind", ["sae", "crosscoder", "fmxcoder"])
def test_ablation_removes_exactly_the_latents_decoder_contribution(lm, dicts, prompt, kind, cumulative):
    """Ablating latent i removes −z_i d_il / s_l at layer l at every real token (0 at BOS): the first chosen
    layer's block output changes by exactly that, a later one's by its change from the previous layer's (the
    stream carries that one), or by the whole of it with cumulative; nothing anywhere else."""
    model_lm, tok = lm
    layers, model = dicts[kind]
    ids, batch = prompt
    keep = batch["keep"]
    clean, outs = clean_pass(model_lm, batch, layers)
    z = latents_on(model, layers, outs, keep)
    i, _ = firing_latent(z)
    assert (z[:, i] > 0).sum() >= 2
    tg = intervene.targets([(layers, model, {})])
    iv = intervene.Intervention([i], ablate=True, cumulative=cumulative)
    edits = intervene.layer_edits(tg, outs, keep, iv)
    logits, added = record_added(model_lm, lambda: intervene.edited_logits(model_lm, batch, outs, edits), outs,
                                 min(layers))
    whole = {}
    for j, l in enumerate(layers):
        whole[l] = torch.zeros_like(added[l])
        whole[l][keep] = -z[:, i, None] * decoder_of(model, i, j) / model.config.input_scale[j]
    want = expected_additions(whole, layers, cumulative)
    for l in range(min(layers), len(activations.block_paths(model_lm))):
        if l in layers:
            torch.testing.assert_close(added[l], want[l], **TOL)
        else:
            assert torch.equal(added[l], torch.zeros_like(added[l]))             # untouched
    assert added[layers[0]][keep].norm(dim=-1).gt(0).sum() == (z[:, i] > 0).sum()    # only where it fires
    assert not torch.allclose(logits, clean, atol=1e-4)                         # and the output changed


def literal_ablation_logits(lm, batch, layers, model, latents, cumulative=True):
    """The definition, written out as a full forward pass with one hook per layer: block l outputs
    x̂'_l / s_l + (h_l − x̂_l / s_l), x̂ = z W_dec + b_dec from the clean pass's z, x̂' the same with the latents
    zeroed (SAE: W_dec (F, d); crosscoder: W_dec (F, L, d)); without `cumulative`, a later layer then adds back
    the previous layer's x̂_l' / s_l' − x̂'_l' / s_l', which the stream carries from there."""
    keep = batch["keep"]
    _, outs = activations.block_outputs(lm, batch, layers)
    z = latents_on(model, layers, outs, keep)
    z_off = z.clone()
    z_off[:, latents] = 0
    W = model.W_dec.detach() if model.W_dec.ndim == 3 else model.W_dec.detach()[:, None]
    b = model.b_dec.detach().reshape(len(layers), -1)
    recon = lambda zz, j: zz @ W[:, j] + b[j]  # noqa: E731
    blocks = dict(lm.named_modules())

    def hook(j):
        s = model.config.input_scale[j]

        def fn(m, args, out):
            h = out.clone()
            h[keep] = recon(z_off, j) / s + (h[keep] - recon(z, j) / s)
            if j > 0 and not cumulative:
                s0 = model.config.input_scale[j - 1]
                h[keep] += recon(z, j - 1) / s0 - recon(z_off, j - 1) / s0
            return h
        return fn

    handles = [blocks[activations.block_paths(lm)[l]].register_forward_hook(hook(j)) for j, l in enumerate(layers)]
    try:
        with torch.no_grad():
            return lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("kind", ["sae", "crosscoder"])
def test_ablation_equals_the_literal_reconstruction_plus_error_and_nothing_ablated_is_the_identity(lm, dicts, prompt, kind):
    model_lm, tok = lm
    layers, model = dicts[kind]
    ids, batch = prompt
    clean, outs = clean_pass(model_lm, batch, layers)
    i, never = firing_latent(latents_on(model, layers, outs, batch["keep"]))
    tg = intervene.targets([(layers, model, {})])
    for cumulative in (False, True):
        _, got, _, _ = intervene.intervened(model_lm, batch, tg, intervene.Intervention([i], ablate=True,
                                                                                       cumulative=cumulative))
        torch.testing.assert_close(got, literal_ablation_logits(model_lm, batch, layers, model, [i], cumulative), **TOL)
    if kind == "crosscoder":                              # the two differ
        assert not torch.allclose(got, literal_ablation_logits(model_lm, batch, layers, model, [i], False), atol=1e-4)
    # nothing ablated, the error kept: the literal form with z' = z, and the module with a latent that never fires
    torch.testing.assert_close(literal_ablation_logits(model_lm, batch, layers, model, []), clean, **TOL)
    _, same, _, edits = intervene.intervened(model_lm, batch, tg, intervene.Intervention([never], ablate=True))
    torch.testing.assert_close(same, clean, **TOL)
    assert sorted(edits) == layers


def test_polysae_ablation_removes_every_term_of_the_latent(lm, dicts, prompt):
    """PolySAE: block l changes by decode(z') − decode(z), the polynomial written out (a = zU, y1 + λ2 y2 + λ3 y3),
    which is not the linear term −z_i D1[i] alone (the latent's interactions go with it)."""
    model_lm, tok = lm
    layers, model = dicts["polysae"]
    ids, batch = prompt
    keep = batch["keep"]
    clean, outs = clean_pass(model_lm, batch, layers)
    z = latents_on(model, layers, outs, keep)
    i, _ = firing_latent(z)
    edits = intervene.layer_edits(intervene.targets([(layers, model, {})]), outs, keep,
                                  intervene.Intervention([i], ablate=True))
    U, C1, C2, C3 = (model.U.detach(), model.C1.detach(), model.C2.detach(), model.C3.detach())
    lam2, lam3 = model.lambda2.item(), model.lambda3.item()

    def poly(zz):
        a = zz @ U
        return a @ C1.T + lam2 * a[:, :8].pow(2) @ C2.T + lam3 * a[:, :8].pow(3) @ C3.T

    z_off = z.clone()
    z_off[:, i] = 0
    want = (poly(z_off) - poly(z)) / 2.0
    torch.testing.assert_close(edits[1], want, **TOL)
    linear_only = -z[:, i, None] * decoder_of(model, i, 0) / 2.0
    assert (edits[1] - linear_only).norm() > 1e-3 * linear_only.norm()


# ----------------------------------------------------------------------------------------
# Steering
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cumulative", [False, True])
@pytest.mark.parametrize("kind", ["crosscoder", "fmxcoder"])
@pytest.mark.parametrize("at", [None, "1", "0,2"])
def test_crosscoder_steering_adds_alpha_d_at_each_chosen_layer_and_nothing_elsewhere(lm, dicts, prompt, kind, at,
                                                                                     cumulative):
    """Steering adds α d_il / s_l at the first chosen layer, and at each later chosen layer the change
    α (d_il / s_l − d_il' / s_l') from the previous one l' (or α d_il / s_l whole with cumulative); nothing at the
    other layers."""
    model_lm, tok = lm
    layers, model = dicts[kind]
    ids, batch = prompt
    keep = batch["keep"]
    chosen = layers if at is None else [int(v) for v in at.split(",")]
    clean, outs = clean_pass(model_lm, batch, layers)
    tg = intervene.targets([(layers, model, {})], at)
    assert tg[0].at == chosen
    alpha, i = 2.5, 7
    edits = intervene.layer_edits(tg, outs, keep, intervene.Intervention([i], steer=alpha, cumulative=cumulative))
    logits, added = record_added(model_lm, lambda: intervene.edited_logits(model_lm, batch, outs, edits), outs,
                                 min(chosen))
    whole = {}
    for l in chosen:
        j = layers.index(l)
        whole[l] = torch.zeros_like(added[l])
        whole[l][keep] = alpha * decoder_of(model, i, j) / model.config.input_scale[j]
    want = expected_additions(whole, chosen, cumulative)
    for l in range(min(chosen), len(activations.block_paths(model_lm))):
        torch.testing.assert_close(added[l], want.get(l, torch.zeros_like(added[l])), **TOL)
    assert not torch.allclose(logits, clean, atol=1e-4)


def identity_blocks(lm):
    """A copy of the LM whose blocks add nothing (attention and MLP output projections zeroed): h_l = h_0."""
    lm = copy.deepcopy(lm)
    with torch.no_grad():
        for block in lm.transformer.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.zero_()
                proj.bias.zero_()
    return lm


@pytest.mark.parametrize("cumulative", [False, True])
def test_the_stream_at_each_layer_holds_that_layers_edit_or_their_sum_with_cumulative(lm, dicts, prompt, cumulative):
    """With blocks that add nothing, the stream at layer l is the clean one plus exactly what the edits' chain
    holds there: α d_il / s_l (the default, which does not add again what the stream carries) or the sum over
    the chosen layers up to l (cumulative). Ablation likewise: −z_i d_il / s_l."""
    model_lm, tok = lm
    flat = identity_blocks(model_lm)
    layers, model = dicts["crosscoder"]
    _, batch = prompt
    keep = batch["keep"]
    clean, outs = clean_pass(flat, batch, [0, 1, 2, 3])
    assert torch.equal(outs[3], outs[0])                                         # the blocks add nothing
    z = latents_on(model, layers, outs, keep)
    i, _ = firing_latent(z)
    s = model.config.input_scale
    for iv, per_layer in ((intervene.Intervention([i], steer=2.5, cumulative=cumulative),
                           lambda j: 2.5 * decoder_of(model, i, j) / s[j]),
                          (intervene.Intervention([i], ablate=True, cumulative=cumulative),
                           lambda j: -z[:, i, None] * decoder_of(model, i, j) / s[j])):
        edits = intervene.layer_edits(intervene.targets([(layers, model, {})]), outs, keep, iv)
        seen = {}
        handles = [blk.register_forward_pre_hook(lambda m, args, l=l: seen.__setitem__(l - 1, args[0].clone()))
                   for l, blk in enumerate(flat.transformer.h) if l > 0]
        try:
            intervene.edited_logits(flat, batch, outs, edits)
        finally:
            for h in handles:
                h.remove()
        for j, l in enumerate(layers):
            want = torch.zeros_like(outs[l])
            want[keep] = sum(per_layer(jj) for jj in range(j + 1)) if cumulative else per_layer(j)
            torch.testing.assert_close(seen[l] - outs[l], want, **TOL)


def test_steering_several_latents_adds_their_sum(lm, dicts, prompt):
    model_lm, tok = lm
    layers, model = dicts["sae"]
    _, batch = prompt
    _, outs = clean_pass(model_lm, batch, layers)
    tg = intervene.targets([(layers, model, {})])
    edits = intervene.layer_edits(tg, outs, batch["keep"], intervene.Intervention([3, 5], steer=-1.5))
    torch.testing.assert_close(edits[1], -1.5 * (model.W_dec[3] + model.W_dec[5]).detach() / 0.7, **TOL)


@pytest.mark.parametrize("kind", ["sae", "crosscoder", "fmxcoder", "polysae"])
def test_steering_with_alpha_zero_is_the_identity(lm, dicts, prompt, kind):
    model_lm, tok = lm
    layers, model = dicts[kind]
    entries = [(layers, model, {})]
    r = intervene.compare(model_lm, tok, entries, PROMPT, intervene.Intervention([3], steer=0.0), n_tokens=4, top=3)
    assert r["kl"] == pytest.approx(0.0, abs=1e-9) and r["kl_mean_prompt"] == pytest.approx(0.0, abs=1e-9)
    assert r["intervened"] == r["clean"]
    _, batch = prompt
    clean, got, _, _ = intervene.intervened(model_lm, batch, intervene.targets(entries),
                                            intervene.Intervention([3], steer=0.0))
    torch.testing.assert_close(got, clean, **TOL)


def test_polysae_steers_along_its_linear_decoder_direction(lm, dicts, prompt):
    model_lm, tok = lm
    layers, model = dicts["polysae"]
    _, batch = prompt
    _, outs = clean_pass(model_lm, batch, layers)
    edits = intervene.layer_edits(intervene.targets([(layers, model, {})]), outs, batch["keep"],
                                  intervene.Intervention([5], steer=3.0))
    torch.testing.assert_close(edits[1], 3.0 * decoder_of(model, 5, 0) / 2.0, **TOL)


@pytest.mark.parametrize("kind", ["sae", "crosscoder", "fmxcoder", "polysae"])
def test_a_folded_dictionary_makes_the_same_raw_edits(lm, dicts, prompt, kind):
    """Units: fold_input_scale (s = 1, weights in raw units) must not change what is added to the stream."""
    model_lm, tok = lm
    layers, model = dicts[kind]
    folded = copy.deepcopy(model)
    folded.fold_input_scale()
    assert folded.config.input_scale == [1.0] * len(layers)
    _, batch = prompt
    _, outs = clean_pass(model_lm, batch, layers)
    z = latents_on(model, layers, outs, batch["keep"])
    i, _ = firing_latent(z)
    for iv in (intervene.Intervention([i], ablate=True), intervene.Intervention([i], steer=1.7)):
        a, b = (intervene.layer_edits(intervene.targets([(layers, m, {})]), outs, batch["keep"], iv)
                for m in (model, folded))
        assert sorted(a) == sorted(b) == layers
        for l in layers:
            assert a[l].abs().max() > 0
            torch.testing.assert_close(a[l], b[l], rtol=1e-4, atol=1e-5)


def test_a_per_layer_set_edits_with_the_sae_of_each_chosen_layer(lm, prompt):
    model_lm, tok = lm
    torch.manual_seed(5)
    sae1 = SAE(SAEConfig(d_in=64, n_latents=32, k=4, sparsity="topk", input_scale=[0.7])).eval()
    sae2 = SAE(SAEConfig(d_in=64, n_latents=32, k=4, sparsity="topk", input_scale=[4.0])).eval()
    entries = [([1], sae1, {}), ([2], sae2, {})]
    with pytest.raises(ValueError, match="per-layer set of 2 dictionaries.*--layers"):
        intervene.targets(entries)
    with pytest.raises(ValueError, match="read blocks 1, 2, not 3"):
        intervene.targets(entries, "3")
    _, batch = prompt
    _, outs = clean_pass(model_lm, batch, [1, 2])
    edits = intervene.layer_edits(intervene.targets(entries, "2"), outs, batch["keep"],
                                  intervene.Intervention([9], steer=2.0))
    assert list(edits) == [2]
    torch.testing.assert_close(edits[2], 2.0 * sae2.W_dec[9].detach() / 4.0, **TOL)
    both = intervene.layer_edits(intervene.targets(entries, "1-2"), outs, batch["keep"],
                                 intervene.Intervention([9], steer=2.0))
    torch.testing.assert_close(both[1], 2.0 * sae1.W_dec[9].detach() / 0.7, **TOL)


@pytest.mark.slow
def test_on_smollm2_steering_adds_at_the_chosen_blocks_exactly():
    """The offline SmolLM2 (Llama blocks, RMSNorm): a random crosscoder on blocks 11 and 13 adds α d_11 / s_11
    at 11 and the change to α d_13 / s_13 at 13 exactly (the hooks work on these blocks too), α = 0 and ablating
    a latent that does not fire are the identity, steering at the last block gives the logits of the final norm
    and W_U applied by hand, and the KV-cached continuations equal generate's and the uncached intervened pass's."""
    model_lm, tok = activations.load_lm()
    torch.manual_seed(0)
    cc = with_bias(CrossCoder(CrossCoderConfig(d_in=576, n_latents=64, k=8, sparsity="topk", n_layers=2,
                                               input_scale=[0.4, 0.25])), 6)
    prompt = "The capital of France is"
    batch = intervene.prompt_batch(tok, intervene.prompt_ids(tok, prompt))
    clean, outs = clean_pass(model_lm, batch, [11, 13])
    tg = intervene.targets([([11, 13], cc, {})])
    edits = intervene.layer_edits(tg, outs, batch["keep"], intervene.Intervention([5], steer=30.0))
    logits, added = record_added(model_lm, lambda: intervene.edited_logits(model_lm, batch, outs, edits), outs, 11)
    whole = {}
    for j, l in enumerate((11, 13)):
        whole[l] = torch.zeros_like(added[l])
        whole[l][batch["keep"]] = 30.0 * cc.W_dec[5, j].detach() / cc.config.input_scale[j]
    want = expected_additions(whole, [11, 13], False)
    for l in range(11, 30):
        torch.testing.assert_close(added[l], want.get(l, torch.zeros_like(added[l])), rtol=0, atol=1e-4)
    assert intervene.kl(clean[0, -1], logits[0, -1]) > 1e-3
    z = latents_on(cc, [11, 13], outs, batch["keep"])
    _, never = firing_latent(z)
    for iv in (intervene.Intervention([5], steer=0.0), intervene.Intervention([never], ablate=True)):
        torch.testing.assert_close(intervene.intervened(model_lm, batch, tg, iv)[1], clean, rtol=0, atol=1e-4)
    sae = SAE(SAEConfig(d_in=576, n_latents=16, k=2, sparsity="topk", input_scale=[0.5])).eval()
    _, outs = clean_pass(model_lm, batch, [29])                  # at the last block: the final norm and W_U by hand
    edited = intervene.intervened(model_lm, batch, [intervene.Target(sae, [29], [29])],
                                  intervene.Intervention([3], steer=200.0))[1]
    h = outs[29][0, -1] + 200.0 * sae.W_dec[3].detach() / 0.5
    want = features.final_norm(model_lm)(h) @ model_lm.get_output_embeddings().weight.detach().T
    torch.testing.assert_close(edited[0, -1], want, rtol=0, atol=1e-3)
    ids = intervene.prompt_ids(tok, prompt)                        # the KV-cached continuations on Llama blocks
    ref = model_lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=6, do_sample=False)
    assert intervene.greedy(model_lm, tok, ids, 6) == ref[0, len(ids):].tolist()
    iv = intervene.Intervention([5], steer=30.0)
    got, seq = intervene.greedy(model_lm, tok, ids, 4, tg, iv), list(ids)
    for t in got:
        assert int(intervene.intervened(model_lm, intervene.prompt_batch(tok, seq), tg, iv)[1][0, -1].argmax()) == t
        seq.append(t)


# ----------------------------------------------------------------------------------------
# The report and the continuation
# ----------------------------------------------------------------------------------------


def test_next_token_change_is_kl_and_the_ranked_probability_change():
    g = torch.Generator().manual_seed(0)
    p, q = 3 * torch.randn(50, generator=g), 3 * torch.randn(50, generator=g)
    r = intervene.next_token_change(p, q, 5)
    pp, qq = p.double().softmax(-1), q.double().softmax(-1)
    assert r["kl"] == pytest.approx(float((pp * (pp / qq).log()).sum()), rel=1e-9)
    assert [row[0] for row in r["promoted"]] == (qq - pp).argsort(descending=True)[:5].tolist()
    assert [row[0] for row in r["suppressed"]] == (qq - pp).argsort()[:5].tolist()
    for i, pi, qi, lr in r["promoted"] + r["suppressed"]:
        assert (pi, qi, lr) == pytest.approx((pp[i].item(), qq[i].item(), (qq[i] / pp[i]).log().item()), rel=1e-9)


def test_greedy_continuation_matches_transformers_generate(lm):
    model_lm, tok = lm
    ids = intervene.prompt_ids(tok, PROMPT)
    got = intervene.greedy(model_lm, tok, ids, 6)
    with torch.no_grad():
        ref = model_lm.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert got == ref[0, len(ids):].tolist()


@pytest.mark.parametrize("how", ["steer", "ablate"])
def test_intervened_continuation_applies_the_edit_at_every_step(lm, dicts, how):
    """Each generated token (KV caches, one token a step) is the argmax of the intervened pass over the whole
    sequence so far (no cache, replayed from a clean pass)."""
    model_lm, tok = lm
    layers, model = dicts["crosscoder"]
    tg = intervene.targets([(layers, model, {})])
    ids = intervene.prompt_ids(tok, PROMPT)
    batch = intervene.prompt_batch(tok, ids)
    i, _ = firing_latent(latents_on(model, layers, clean_pass(model_lm, batch, layers)[1], batch["keep"]))
    iv = intervene.Intervention([7], steer=40.0) if how == "steer" else intervene.Intervention([i], ablate=True)
    got = intervene.greedy(model_lm, tok, ids, 5, tg, iv)
    seq = list(ids)
    for t in got:
        _, logits, _, _ = intervene.intervened(model_lm, intervene.prompt_batch(tok, seq), tg, iv)
        assert int(logits[0, -1].argmax()) == t
        seq.append(t)
    if how == "steer":
        assert got != intervene.greedy(model_lm, tok, ids, 5)         # a strong steer changes the continuation


# ----------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------


def save_run(folder, gpt2_dir, layers, model):
    saved.save(model, folder, {"run": {"model": gpt2_dir, "layers": layers}})
    return folder


def test_command_line_prints_the_report(lm, dicts, gpt2_dir, tmp_path, capsys):
    layers, model = dicts["crosscoder"]
    run = save_run(tmp_path / "cc", gpt2_dir, layers, model)
    assert intervene.main([str(run), "--latent", "7", "--steer", "40", "--layers", "1", "--prompt", PROMPT,
                           "--tokens", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "steer α = 40 with latent 7 at block 1" in out and "KL(clean || intervened)" in out
    assert "promoted:" in out and "intervened: " + PROMPT in out
    assert intervene.main([str(run), "--latent", "7", "--ablate", "--prompt", PROMPT, "--tokens", "0",
                           "--device", "cpu"]) == 0
    assert "ablate latent 7 at blocks 0, 1, 2" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    ([], "--latent is required"),
    (["--latent", "7"], "pass either --ablate or --steer ALPHA"),
    (["--latent", "7", "--ablate", "--steer", "2"], "pass either --ablate or --steer ALPHA"),
    (["--latent", "32", "--ablate"], "--latent 32 does not exist: the dictionary has 32 latents"),
    (["--latent", "3,3", "--ablate"], "must not repeat"),
    (["--latent", "3", "--ablate", "--layers", "5"], "read blocks 0, 1, 2, not 5"),
    (["--latent", "3", "--steer", "nan"], "--steer must be a finite number"),
    (["--latent", "3", "--ablate", "--prompt", " "], "--prompt must be a non-empty text"),
])
def test_command_line_errors_are_one_line(dicts, gpt2_dir, tmp_path, capsys, args, message):
    layers, model = dicts["crosscoder"]
    run = save_run(tmp_path / "cc", gpt2_dir, layers, model)
    assert intervene.main([str(run), "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_set_of_dictionaries_is_refused_with_their_names(dicts, gpt2_dir, tmp_path, capsys):
    for name in ("cc", "sae"):
        layers, model = dicts["crosscoder" if name == "cc" else "sae"]
        save_run(tmp_path / "set" / name, gpt2_dir, layers, model)
    assert intervene.main([str(tmp_path / "set"), "--latent", "1", "--ablate", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "holds a set of 2 dictionaries (cc, sae)" in err and str(tmp_path / "set" / "cc") in err


# ----------------------------------------------------------------------------------------
# features.py --intervene: each latent ablated in its top contexts
# ----------------------------------------------------------------------------------------


def test_top_context_effects_equal_one_context_at_a_time(lm, dicts):
    """The batched, padded computation with a different latent per row equals the single-row ablation of
    intervene.intervened on each context, averaged."""
    model_lm, tok = lm
    layers, model = dicts["crosscoder"]
    g = torch.Generator().manual_seed(0)
    F, K, left = model.config.n_latents, 3, 5
    ids = torch.randint(300, 5000, (F, K, left + 3), generator=g)
    ids[0, 0, :2] = -1                                      # a context at a window's start: the BOS is given
    ids[0, 0, 2] = tok.bos_token_id
    ids[1, 1, :3] = -1                                      # one cut by the window, without BOS
    key = torch.randn(F, K, generator=g)
    key[2, 1:] = -float("inf")                              # a latent with one top context only
    key[3] = -float("inf")                                  # and one that never fired
    chosen = [0, 1, 2, 3, 4]
    effects = intervene.top_context_effects(model_lm, tok, layers, model, ids[chosen], key[chosen], left, 2, 4,
                                            rows_per_batch=3)
    assert sorted(effects) == [0, 1, 2, 4] and effects[2]["contexts"] == 1 and effects[0]["contexts"] == 2
    tg = intervene.targets([(layers, model, {})])
    for n, f in enumerate(chosen):
        if f == 3:
            continue
        drops, kls = [], []
        for k in range(effects[n]["contexts"]):
            row = [i for i in ids[f, k, :left + 1].tolist() if i >= 0]
            row = row if row[0] == tok.bos_token_id else [tok.bos_token_id] + row
            clean, edited, _, _ = intervene.intervened(model_lm, intervene.prompt_batch(tok, row), tg,
                                                       intervene.Intervention([n], ablate=True))
            drops.append(clean[0, -1].double().softmax(-1) - edited[0, -1].double().softmax(-1))
            kls.append(intervene.kl(clean[0, -1], edited[0, -1]).item())
        mean = torch.stack(drops).mean(0)
        assert [i for i, _ in effects[n]["promoted"]] == mean.topk(4).indices.tolist()
        assert [v for _, v in effects[n]["promoted"]] == pytest.approx(mean.topk(4).values.tolist(), rel=1e-3, abs=1e-6)
        assert [i for i, _ in effects[n]["suppressed"]] == mean.topk(4, largest=False).indices.tolist()
        assert effects[n]["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-3, abs=1e-9)
    json.dumps(effects)                                     # JSON-ready
