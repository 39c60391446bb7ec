"""support/progress.py: the training bar's figures per dictionary of a run, on hand-built steps."""
import pytest
import torch

import core
import sae
from support import progress


def _out(x, recon, n_active, loss):
    z = torch.zeros(len(x), 16)
    z[:, :n_active] = 1.0
    zero = torch.tensor(0.0)
    return core.Output(recon, z, z, torch.tensor(loss), zero, zero, zero)


def test_each_dictionary_of_a_set_gets_its_own_labelled_figures():
    g = torch.Generator().manual_seed(0)
    models = {(name, "all"): sae.SAE(sae.SAEConfig(d_in=8, n_latents=16, k=2, dead_tokens=1000))
              for name in ("crosscoder", "masked")}
    models[("masked", "all")].tokens_since_fired.fill_(5000)              # every latent of "masked" is dead
    logs = progress.Logs(100)
    steps = []
    for _ in range(2):
        x = torch.randn(32, 8, generator=g)
        good, bad = x + 0.1 * torch.randn(32, 8, generator=g), x + torch.randn(32, 8, generator=g)
        logs.add(("crosscoder", "all"), _out(x, good, 3, 1.0), x)
        logs.add(("masked", "all"), _out(x, bad, 5, 2.0), x)
        fvu = lambda r: ((x - r) ** 2).sum().item() / ((x - x.mean(0)) ** 2).sum().item()   # noqa: E731
        steps.append((fvu(good), fvu(bad)))
    fig = logs.read(models, 2)
    assert fig["crosscoder"]["FVU"] == pytest.approx(sum(s[0] for s in steps) / 2, rel=1e-5)
    assert fig["masked"]["FVU"] == pytest.approx(sum(s[1] for s in steps) / 2, rel=1e-5)
    assert (fig["crosscoder"]["L0"], fig["masked"]["L0"]) == (3.0, 5.0)
    assert (fig["crosscoder"]["loss"], fig["masked"]["loss"]) == (1.0, 2.0)
    assert (fig["crosscoder"]["dead"], fig["masked"]["dead"]) == (0.0, 1.0)
    bar = progress.postfix(fig, 1234.0)
    assert bar["crosscoder"].startswith(f"FVU {fig['crosscoder']['FVU']:.3f} L0 3.0 dead 0.00")
    assert bar["masked"].startswith(f"FVU {fig['masked']['FVU']:.3f}") and bar["tok_s"] == "1,234"
    alone = progress.postfix({"fmxcoder": fig["crosscoder"]}, 10.0)       # one dictionary: the plain bar
    assert set(alone) == {"loss", "L0", "FVU", "dead", "tok_s"}


def test_a_per_layer_set_is_averaged_over_its_layers_and_a_bad_loss_is_named():
    models = {("sae", l): sae.SAE(sae.SAEConfig(d_in=4, n_latents=16, k=2)) for l in (3, 4)}
    logs = progress.Logs(10)
    x = torch.ones(4, 4) + torch.arange(4.0)[:, None]
    logs.add(("sae", 3), _out(x, x, 2, 1.0), x)
    logs.add(("sae", 4), _out(x, x, 4, 3.0), x)
    fig = logs.read(models, 1)
    assert list(fig) == ["sae"] and fig["sae"]["L0"] == 3.0 and fig["sae"]["loss"] == 2.0
    logs.add(("sae", 3), _out(x, x, 2, float("nan")), x)
    with pytest.raises(ValueError, match="the loss became nan by step 7"):
        logs.read(models, 7)


def test_run_notes_name_an_auxk_that_never_switched_on_and_an_unsettled_batchtopk_threshold():
    from support import notes

    c = sae.SAEConfig(d_in=8, n_latents=64, k=32, sparsity="batchtopk", dead_tokens=100_000)
    lines = notes.run_notes(99_840, 195, {"fmxcoder": c}, {"fmxcoder": [16.5]})
    assert len(lines) == 2
    assert "--dead-tokens 100,000 >= the 99,840 tokens trained" in lines[0] and "AuxK never switched on" in lines[0]
    assert "held-out L0 16.5 for k 32" in lines[1] and "195 steps" in lines[1]
    assert notes.run_notes(200_000, 390, {"fmxcoder": c}, {"fmxcoder": [30.0]}) == []     # 30 is within 25 % of 32
    assert notes.run_notes(99_840, 195, {"s": sae.SAEConfig(d_in=8, n_latents=64, k=32, sparsity="topk",
                                                           aux_coeff=0.0)}, {"s": [3.0]}) == []
    # a per-layer set: the mean of its layers' L0
    assert notes.run_notes(200_000, 390, {"sae": c}, {"sae": [10.0, 50.0]}) == []
