"""Notes printed where a train.py run ends: settings that the run's length left without effect.

  AuxK (core.py; Gao et al. 2024, arXiv 2406.04093) acts only on latents that have not fired for
  `dead_tokens` tokens: a run of T ≤ dead_tokens training tokens can have no dead latent, so AuxK never
  switched on, whatever the dictionary did (train.py's default run: 195 steps × 512 = 99,840 tokens against
  --dead-tokens 100,000).
  BatchTopK keeps k latents per token on average over a batch in training; inference uses a threshold θ
  estimated along training (an exponential moving average of the smallest kept activation, momentum 0.01:
  about 100 steps to forget its start). A short run is evaluated at a held-out L0 far from k while θ has
  not settled: the note names both numbers (|L0 − k| > L0_TOLERANCE · k).
"""
from __future__ import annotations

L0_TOLERANCE = 0.25        # held-out L0 outside k ± 25 %: BatchTopK's threshold has not settled


def run_notes(tokens: int, steps: int, configs: dict, evals: dict) -> list[str]:
    """One line per dictionary setting the run left inert. configs: {dictionary name: its config}
    (core.DictConfig fields: sparsity, k, aux_coeff, dead_tokens); evals: {name: [held-out L0 of each of its
    models]} (a per-layer set: one per layer)."""
    out = []
    for name, c in configs.items():
        if c.aux_coeff > 0 and c.dead_tokens >= tokens:
            out.append(f"note: {name}: --dead-tokens {c.dead_tokens:,} >= the {tokens:,} tokens trained, so no latent "
                       f"could count as dead and AuxK never switched on (lower --dead-tokens below the run's tokens, "
                       f"e.g. {max(1, tokens // 4):,}, or train longer)")
        l0s = [l0 for l0 in evals.get(name, []) if l0 is not None]
        if c.sparsity == "batchtopk" and l0s:
            l0 = sum(l0s) / len(l0s)
            if abs(l0 - c.k) > L0_TOLERANCE * c.k:
                out.append(f"note: {name}: held-out L0 {l0:.1f} for k {c.k}: BatchTopK's inference threshold (a "
                           f"moving estimate) has not settled in {steps:,} steps; train longer for an L0 near k")
    return out
