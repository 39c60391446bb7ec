"""The defaults a copier meets (`SAE(SAEConfig(d_in=...))` and its siblings), pinned: each is a choice, stated in
its model file's docstring ("Defaults."), and train.py's runs depend on them (tests/test_golden.py). Moving one
changes what existing code computes: the restructure that moved SAEConfig's sparsity from topk to batchtopk
silently turned bench/bench_vs_saelens.py's TopK SAE into a BatchTopK one. Change a value here only together
with the docstring and after checking what runs with it."""
import dataclasses

import pytest

import crosscoder
import fmxcoder
import polysae
import sae

D = 64
SHARED = {"n_latents": 2048, "k": 32, "sparsity": "batchtopk", "l1_coeff": 0.0, "aux_k": D // 2,
          "aux_coeff": 1 / 32, "dead_tokens": 100_000}
EXPECTED = {
    sae.SAEConfig: {**SHARED, "input_scale": [1.0], "decoder_norm": "unit", "decoder_init_norm": 1.0},
    crosscoder.CrossCoderConfig: {**SHARED, "input_scale": [1.0, 1.0], "n_layers": 2, "mask_prob": 0.0},
    fmxcoder.FMXCoderConfig: {**SHARED, "input_scale": [1.0, 1.0], "n_layers": 2, "mask_prob": 0.05,
                              "norm_every": 10, "rank": 32, "factorization": "tr"},
    polysae.PolySAEConfig: {**SHARED, "input_scale": [1.0], "ranks": [D, 64, 64], "order": 3,
                            "lambda2_init": -0.5, "lambda3_init": 0.5, "untied_init": False},
}


@pytest.mark.parametrize("config_cls", EXPECTED, ids=lambda c: c.__name__)
def test_the_defaults_a_copier_meets(config_cls):
    c = dataclasses.asdict(config_cls(d_in=D))
    c["ranks"] = list(c["ranks"]) if c.get("ranks") is not None else c.get("ranks", "-")
    got = {k: v for k, v in c.items() if k != "d_in" and not (k == "ranks" and v == "-")}
    assert got == EXPECTED[config_cls]


@pytest.mark.parametrize("module", [sae, crosscoder, fmxcoder, polysae], ids=lambda m: m.__name__)
def test_each_model_file_states_its_defaults(module):
    """The docstring says what SAE(SAEConfig(d_in=...)) etc. is (BatchTopK, not TopK, unless sparsity is set)."""
    assert "Defaults." in module.__doc__ and "batchtopk" in module.__doc__.split("Defaults.")[1].lower()
