"""The sparse encoder backward (core.SparseEncoderGrad) against dense autograd, and a training step
without host–device syncs, for all four dictionaries."""
import contextlib
import copy

import pytest
import torch

import crosscoder as cc
import fmxcoder as fx
import polysae
import sae
import core

KINDS = ["sae", "polysae", "crosscoder", "crosscoder-masked", "fmxcoder-cp", "fmxcoder-tr"]


def make(kind, sparsity="topk", dead_tokens=10_000_000, dtype=torch.float32, device="cpu", **kw):
    torch.manual_seed(0)
    common = {**dict(d_in=8, n_latents=64, k=4, sparsity=sparsity, dead_tokens=dead_tokens, aux_k=6), **kw}
    if kind == "sae":
        model = sae.SAE(sae.SAEConfig(**common))
    elif kind == "polysae":
        model = polysae.PolySAE(polysae.PolySAEConfig(**common, ranks=(8, 4, 4)))
    elif kind.startswith("crosscoder"):
        model = cc.CrossCoder(cc.CrossCoderConfig(**common, n_layers=3, mask_prob=0.3 if "masked" in kind else 0.0))
    else:
        fact = kind.split("-")[1]
        model = fx.FMXCoder(fx.FMXCoderConfig(**{"norm_every": 3, **common}, n_layers=3, factorization=fact,
                                              rank=8 if fact == "cp" else [2, 4, 4]))
    model = model.to(device=device, dtype=dtype)
    with torch.no_grad():   # move the biases away from 0 so that every term of the gradient is exercised
        model.b_enc.normal_(0, 0.1)
        model.b_dec.normal_(0, 0.1)
    return model


def batch(kind, n=24, dtype=torch.float32, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 8) if kind in ("sae", "polysae") else (n, 3, 8)
    return torch.randn(shape, generator=g, dtype=dtype).to(device)


@contextlib.contextmanager
def backward_path(sparse: bool, device):
    old = dict(core.SPARSE_BACKWARD)
    kind = torch.device(device).type
    core.SPARSE_BACKWARD.update({kind: sparse, f"{kind}+autocast": sparse})
    try:
        yield
    finally:
        core.SPARSE_BACKWARD.clear()
        core.SPARSE_BACKWARD.update(old)


def gradients(model, x, sparse, device):
    with backward_path(sparse, device):
        torch.manual_seed(2)    # the same layer mask for both paths
        out = model.train()(x)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


def assert_rel_close(a, b, rtol, what):
    """|a − b| ≤ rtol · max|b| elementwise (relative to the tensor's scale: most entries are 0)."""
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    err = ((a - b).abs().max() / scale).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dead", [False, True], ids=["none-dead", "dead-auxk"])
@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_backward_gives_the_dense_gradients(kind, sparsity, dead, dtype, device):
    dense = make(kind, sparsity, dead_tokens=0 if dead else 10_000_000, dtype=dtype, device=device)
    sparse = copy.deepcopy(dense)
    x = batch(kind, dtype=dtype, device=device)
    out_d, g_d = gradients(dense, x, False, device)
    out_s, g_s = gradients(sparse, x, True, device)
    assert (out_d.auxk > 0).item() == dead and (out_s.auxk > 0).item() == dead
    for name in out_d._fields:
        torch.testing.assert_close(getattr(out_s, name), getattr(out_d, name), rtol=1e-5, atol=1e-6)
    assert set(g_s) == set(g_d)
    for name in g_d:
        assert g_d[name] is not None and g_s[name] is not None, name
        assert_rel_close(g_s[name], g_d[name], 1e-5, name)


@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
@pytest.mark.parametrize("kind", KINDS)
def test_twenty_optimiser_steps_give_the_same_weights(kind, sparsity, device):
    """train_step as train.py runs it (Adam, clipping, the upkeep), dead latents from the 3rd step on."""
    models = {}
    for path in (False, True):
        model = make(kind, sparsity, dead_tokens=48, dtype=torch.float64, device=device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(3)
        with backward_path(path, device):
            auxk = [core.train_step(model, opt, batch(kind, dtype=torch.float64, device=device, seed=s)).auxk
                    for s in range(20)]
        assert torch.stack(auxk).gt(0).any().item()   # AuxK ran
        models[path] = model
    for (name, a), (_, b) in zip(models[False].state_dict().items(), models[True].state_dict().items()):
        if a.is_floating_point():
            assert_rel_close(b, a, 1e-5, name)
        else:
            assert torch.equal(a, b), name


def test_sparse_encoder_grad_equals_autograd_with_repeated_entries(device):
    """The Function alone: entries given twice (a latent in the TopK and the AuxK selection) add up."""
    torch.manual_seed(4)
    B, D, F_ = 5, 7, 11
    h = torch.randn(B, D, dtype=torch.float64, device=device, requires_grad=True)
    W = torch.randn(F_, D, dtype=torch.float64, device=device, requires_grad=True)
    b = torch.randn(F_, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.tensor([0, 3, 3, 10, 12, 30, 31, 31, 54], device=device)   # sorted, with repeats, token 1 empty
    g = torch.randn(len(idx), dtype=torch.float64, device=device)
    pre = torch.nn.functional.linear(h, W, b)
    got = torch.autograd.grad((core.SparseEncoderGrad.apply(h, W, b, pre.detach(), idx) * g).sum(), (h, W, b))
    want = torch.autograd.grad((pre.reshape(-1)[idx] * g).sum(), (h, W, b))
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_selection_decode_equals_the_dense_product(device):
    torch.manual_seed(5)
    pre = torch.randn(9, 40, device=device)
    idx, _ = core.select(pre, "batchtopk", 3)
    z = core.Selection(idx, pre.reshape(-1)[idx].relu(), (9, 40))
    W = torch.randn(40, 6, device=device)
    torch.testing.assert_close(core.sparse_decode(z, W), z.dense() @ W)
    torch.testing.assert_close(z.dense(), pre.relu() * (pre >= pre.flatten().topk(27).values.min()))
    assert torch.equal(idx, idx.sort().values) and len(idx) == 27


# -- no host–device synchronisation in a training step -----------------------------------


class SyncCounter:
    """Counts the Python-level calls that make the host wait for the device (on a GPU): .item(),
    bool/int/float of a tensor, tolist, nonzero, and indexing with a boolean tensor. On the CPU
    nothing waits, so this is the test there; on CUDA, torch.cuda.set_sync_debug_mode("error")
    also catches syncs inside torch's own kernels."""

    METHODS = ["item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero"]

    def __init__(self):
        self.calls = []

    def _wrap(self, name, fn):
        def wrapper(t, *a, **kw):
            self.calls.append(name)
            return fn(t, *a, **kw)
        return wrapper

    def _wrap_index(self, name, fn):
        def wrapper(t, index, *a):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                self.calls.append(f"{name}[bool mask]")
            return fn(t, index, *a)
        return wrapper

    @contextlib.contextmanager
    def counting(self, device):
        patch = pytest.MonkeyPatch()
        for name in self.METHODS:
            patch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        patch.setattr(torch, "nonzero", self._wrap("torch.nonzero", torch.nonzero))
        patch.setattr(torch, "masked_select", self._wrap("torch.masked_select", torch.masked_select))
        for name in ("__getitem__", "__setitem__"):
            patch.setattr(torch.Tensor, name, self._wrap_index(name, getattr(torch.Tensor, name)))
        cuda = torch.device(device).type == "cuda"
        try:
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            yield self
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
            patch.undo()


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-backward", "dense-backward"])
@pytest.mark.parametrize("dead", [False, True], ids=["none-dead", "dead-auxk"])
@pytest.mark.parametrize("sparsity", ["topk", "batchtopk"])
@pytest.mark.parametrize("kind", KINDS + ["fmxcoder-tr-exact-norms"])
def test_training_steps_do_not_sync(kind, sparsity, dead, sparse, device):
    kw = {"norm_every": 1} if kind.endswith("exact-norms") else {}
    model = make(kind.removesuffix("-exact-norms"), sparsity, dead_tokens=0 if dead else 10_000_000,
                 device=device, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)   # fused: no .item() of Adam's step count
    xs = [batch(kind.removesuffix("-exact-norms"), device=device, seed=s) for s in range(5)]
    counter = SyncCounter()
    with backward_path(sparse, device):
        core.train_step(model, opt, xs[0])   # on a GPU the first step reads the dead counter once (HostMirror)
        with counter.counting(device):
            outs = [core.train_step(model, opt, x) for x in xs[1:]]
    assert counter.calls == []
    assert all((o.auxk > 0).item() == dead for o in outs)


@pytest.mark.parametrize("kind", ["sae", "crosscoder"])
def test_batchtopk_inference_encode_does_not_sync(kind, device):
    model = make(kind, "batchtopk", device=device).eval()
    x = batch(kind, device=device)
    counter = SyncCounter()
    with counter.counting(device):
        uncalibrated = model.encode(x)
        model.threshold.fill_(0.05)
        calibrated = model.encode(x)
    assert counter.calls == []
    assert ((uncalibrated > 0).sum(-1) == 4).all()                              # per-row TopK
    assert torch.equal(calibrated > 0, core.scores(model.pre_acts(x), model.decoder_scale()) > 0.05)


def test_old_style_syncs_are_counted():
    """The counter sees what a sync-free step must avoid (so the tests above can fail)."""
    t = torch.tensor([0.0, 2.0])
    counter = SyncCounter()
    with counter.counting("cpu"):
        t[0].item()
        bool(t[1] > 0), int(t[1]), float(t[0]), t.nonzero(), t[t > 0]
        t[t > 1] = 0.0
    assert counter.calls == ["item", "__bool__", "__int__", "__float__", "nonzero",
                             "__getitem__[bool mask]", "__setitem__[bool mask]"]


# -- AuxK runs exactly when a latent may be dead --------------------------------------------


class Always:
    """A stand-in for model.dead.bound that always says "a latent may be dead"."""

    def get(self, buf):
        return 1 << 62

    def set(self, buf, value):
        pass


@pytest.mark.parametrize("kind", ["sae", "crosscoder-masked"])
def test_the_host_side_dead_bound_never_skips_auxk(kind, device):
    """Training with the host-side gate equals training with AuxK computed on every step (where it is
    0 until a latent is dead): the bound skips only steps on which nothing can be dead."""
    runs = []
    for gate in (True, False):
        model = make(kind, dead_tokens=60, device=device)
        if not gate:
            model.dead.bound = Always()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(3)
        auxk = [core.train_step(model, opt, batch(kind, device=device, seed=s)).auxk for s in range(8)]
        runs.append((model, torch.stack(auxk)))
    (gated, auxk_g), (always, auxk_a) = runs
    # the ungated run adds AuxK's zero terms to the backward (another computation): float rounding only;
    # a skipped AuxK step while a latent was dead would differ by far more than that
    assert (auxk_g[:3] == 0).all() and (auxk_a[:3] == 0).all() and (auxk_a > 0).any()   # dead from step 4
    torch.testing.assert_close(auxk_g, auxk_a, rtol=1e-5, atol=0)
    for (name, a), (_, b) in zip(gated.state_dict().items(), always.state_dict().items()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        else:                                   # dead counters: integers, far from any selection tie
            assert torch.equal(a, b), name
    assert gated.dead.bound.get(gated.tokens_since_fired) >= gated.tokens_since_fired.max().item()


@pytest.mark.parametrize("kind", ["sae", "crosscoder-masked"])
def test_a_refreshed_dead_count_shrinks_auxk_without_changing_it(kind, device, monkeypatch):
    """model.dead.refresh (train.py calls it at its log steps) lets AuxK select only as many
    entries per token as latents can be dead before the next refresh: the AuxK losses and the weights
    equal those of the full k_aux selection to float rounding (the sums run over fewer masked zeros,
    and the backward adds the same terms in another order), and the selections are smaller."""
    sizes, real = [], core.auxk_indices

    def spy(pre, dead, k):
        sizes.append(k)
        return real(pre, dead, k)

    monkeypatch.setattr(core, "auxk_indices", spy)
    runs = []
    for refresh in (True, False):
        sizes.clear()
        model = make(kind, dead_tokens=60, device=device, aux_k=48)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        torch.manual_seed(3)
        auxk = []
        for s in range(8):
            if refresh:                                # every step of 24 tokens
                model.dead.refresh(model.tokens_since_fired, model.config.dead_tokens, 24)
            auxk.append(core.train_step(model, opt, batch(kind, device=device, seed=s)).auxk)
        runs.append((model, torch.stack(auxk), list(sizes)))
    (small, auxk_s, sizes_s), (full, auxk_f, sizes_f) = runs
    # the same entries selected (the extra ones are masked): the losses agree to float rounding
    torch.testing.assert_close(auxk_s, auxk_f, rtol=1e-5, atol=0)
    assert (auxk_f > 0).any()
    for (name, a), (_, b) in zip(small.state_dict().items(), full.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    # the refreshed run skips the steps on which no latent is dead (AuxK is 0 there in both runs)
    assert set(sizes_f) == {48} and 0 < len(sizes_s) <= len(sizes_f) and max(sizes_s) < 48


def test_dead_bound_is_reread_after_load_state_dict(device):
    """A checkpoint with dead latents: the host re-reads the counter (once) and AuxK runs."""
    src = make("sae", dead_tokens=100, device=device)
    with torch.no_grad():
        src.tokens_since_fired.fill_(500)
    fresh = make("sae", dead_tokens=100, device=device)
    assert fresh.dead.bound.get(fresh.tokens_since_fired) == 0
    fresh.load_state_dict(src.state_dict())
    assert fresh.dead.bound.get(fresh.tokens_since_fired) == 500
    assert fresh.train()(batch("sae", device=device)).auxk.item() > 0


def test_crosscoder_step_mirror_follows_load_state_dict(device):
    model = make("fmxcoder-tr", device=device)    # norm_every 3
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for s in range(4):
        core.train_step(model, opt, batch("fmxcoder-tr", device=device, seed=s))
    assert model.steps_host.get(model.steps_done) == 4 == model.steps_done.item()
    other = make("fmxcoder-tr", device=device)
    other.load_state_dict(model.state_dict())
    assert other.steps_host.get(other.steps_done) == 4


@pytest.mark.parametrize("kind", ["sae", "crosscoder", "fmxcoder-tr"])
def test_bfloat16_autocast_step_runs_on_both_paths(kind, device):
    """Under autocast the encoder product runs in bfloat16; the sparse backward computes in the
    weights' float32; both paths agree to bfloat16 precision."""
    grads = []
    for path in (False, True):
        model = make(kind, device=device)
        x = batch(kind, device=device)
        with backward_path(path, device), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            torch.manual_seed(2)
            out = model.train()(x)
        out.loss.backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_rel_close(grads[1], grads[0], 3e-2, "all gradients")
