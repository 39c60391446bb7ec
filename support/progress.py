"""What train.py's progress bar shows: loss, L0, FVU and dead fraction per dictionary of a run.

Every step each model adds its loss, its mean L0 over the batch and its batch FVU
(core.fvu = Σ‖x − x̂‖² / Σ‖x − mean x‖²) to sums kept on the device; `read` (one host sync, every --log-every
steps) turns them into means over the steps since the last reading. A per-layer set (sae/polysae over several
layers: one model per layer, one name) is averaged over its layers; a run of several dictionaries shows each
one's figures labelled with its name (`postfix`), and support/tracking.py logs the same figures to W&B.
"""
from __future__ import annotations

import math

import torch

import core


class Logs:
    """Loss, L0 and FVU summed on the device every step, per model; read (one sync) every --log-every steps.
    `horizon_tokens`: the tokens between two readings (how far a dead-latent bound may move meanwhile)."""

    def __init__(self, horizon_tokens: int):
        self.sums, self.n, self.horizon = {}, {}, horizon_tokens

    def add(self, key, out: core.Output, x: torch.Tensor) -> None:
        """One step of model `key` = (name, "all" | layer) (no sync: the sums stay on the device)."""
        v = torch.stack([out.loss.detach().float(), (out.latents > 0).float().sum(-1).mean(),
                         core.fvu(x.float(), out.recon.detach().float())])
        self.sums[key] = v if key not in self.sums else self.sums[key] + v
        self.n[key] = self.n.get(key, 0) + 1

    def read(self, models: dict, step: int) -> dict[str, dict[str, float]]:
        """{dictionary name: {"loss", "L0", "FVU", "dead"}}: means over the steps since the last reading (and
        over the layers of a per-layer set); ValueError when a loss is not finite."""
        keys = list(self.sums)
        means = torch.stack([self.sums[k] / self.n[k] for k in keys]).tolist() if keys else []   # the one sync
        self.sums, self.n = {}, {}
        groups: dict[str, list] = {}
        for k, (loss, l0, fvu) in zip(keys, means):
            if not math.isfinite(loss):
                raise ValueError(f"the loss became {loss} by step {step}: lower --lr or check the activations")
            groups.setdefault(k[0], []).append((loss, l0, fvu, core.dead_fraction(models[k])))
        for m in models.values():       # while the host waits anyway: how many latents AuxK may need
            m.dead.refresh(m.tokens_since_fired, m.config.dead_tokens, self.horizon)
        return {name: dict(zip(("loss", "L0", "FVU", "dead"), (sum(c) / len(c) for c in zip(*rows))))
                for name, rows in groups.items()}


def postfix(figures: dict[str, dict[str, float]], tokens_per_s: float) -> dict[str, str]:
    """The bar's postfix: loss, L0, FVU, dead of a lone dictionary; each dictionary's FVU, L0 and dead fraction
    under its name in a run of several; tokens/s."""
    if len(figures) == 1:
        (f,) = figures.values()
        out = {"loss": f"{f['loss']:.3g}", "L0": f"{f['L0']:.1f}", "FVU": f"{f['FVU']:.3f}", "dead": f"{f['dead']:.2f}"}
    else:
        out = {name: f"FVU {f['FVU']:.3f} L0 {f['L0']:.1f} dead {f['dead']:.2f}" for name, f in figures.items()}
    return {**out, "tok_s": f"{tokens_per_s:,.0f}"}
