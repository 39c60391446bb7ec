"""Our TopK SAE (sae.py with sparsity="topk": per-token TopK, not the library's BatchTopK default) against
the public TopK implementations, side by side in one run: SAELens's TopKTrainingSAE trained by its own
SAETrainer step, and dictionary_learning's AutoEncoderTopK with its TopKTrainer when it is installed.
Same activations, width, k, batch, learning rate, steps and batch order, the same method (TopK against
TopK); prints training tokens/s and the held-out FVU after training.

SAELens is not a dependency of this project: install it into a separate venv, which also runs
this script (our sae.py needs only torch). Created from the project's venv, with a .pth file
that puts the project's site-packages after its own, it reuses the project's torch (pip sees it
installed) instead of downloading another:

    python -m venv /tmp/bench-venv                               # with the project's venv active
    python -c "import site; print(site.getsitepackages()[0])" > /tmp/bench-venv/lib/python3.11/site-packages/project.pth
    /tmp/bench-venv/bin/pip install sae-lens
    /tmp/bench-venv/bin/pip install --no-deps dictionary-learning nnsight==0.3.7   # optional last row
    /tmp/bench-venv/bin/pip install "python-socketio[client]"                       # (nnsight imports it)
    python -c "from support import cache; cache.build_cache('/tmp/acts_l15', 'smollm2-135m', layers=[15],
               n_tokens=40_000, multi=False, drop_outliers=10.0)"   # with the project's venv
    /tmp/bench-venv/bin/python bench/bench_vs_saelens.py --cache /tmp/acts_l15

(dictionary-learning's own dependencies would pull another torch with CUDA; --no-deps avoids it.)

Without --cache the data are support/synthetic.py toy activations (d = 576, 8192 atoms). The smallest
setting, which tests/test_errors.py runs on the CPU (only our rows without SAELens installed):
    python bench/bench_vs_saelens.py --tokens 2048 --eval-tokens 512 --n-latents 64 --k 4 --batch 128 \
        --steps 2 --warmup 1

Fairness. The implementations are stepped *interleaved* (one step of each in turn, each timed
on its own), so a noisy or shared machine slows all of them alike. Each side keeps its own
defaults where they are part of the method:
  ours          TopK (sparsity="topk", set here: SAEConfig's default is BatchTopK); unit-norm decoder rows (gradient projection + renormalisation), W_enc = W_decᵀ,
                b_dec = geometric median of the first batch, AuxK coefficient 1/32; one step =
                core.train_step with train.py's Adam (CPU: the sparse encoder backward, the
                default there); a second row steps the same model with Adam(fused=True)
  SAELens       TopKTrainingSAE defaults: decoder rows initialised at norm 0.1, selection on
                pre-activation × decoder norm (rescale_acts_by_decoder_norm), AuxK coefficient 1,
                b_dec = 0; one step = SAETrainer.step (forward + losses, dead-feature counters,
                backward, clip 1.0, Adam, scheduler) as SAETrainer.fit calls it. Two more rows
                change SAELens's speed options: rescale_acts_by_decoder_norm=False (no decoder-norm
                pass in the selection and decode) and, with it, use_sparse_activations=True (TopK
                returns a sparse COO tensor, decoded with a sparse matmul; meant for float32
                without autocast, which is this benchmark's setting): its fastest configuration
  dictionary_learning  TopKTrainer.update (its AuxK, decoder-norm projection, geometric-median b_dec);
                its LR schedule is set constant so all use the same lr
Both count a latent dead after `--dead-steps` steps without firing. Inputs are the cached
activations scaled so that E‖x‖² = d (SAELens normalize_activations="none").
FVU = Σ‖x − x̂‖² / Σ‖x − mean‖² over the held-out tokens (the last `--eval-tokens`), in eval mode.
"""
from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sae  # noqa: E402
import core  # noqa: E402


def load_data(a) -> tuple[torch.Tensor, torch.Tensor]:
    """(train (N, d), held-out (M, d)) float32, scaled so that E‖x‖² ≈ d."""
    if a.cache:
        from support import cache as activation_cache
        cache = activation_cache.ActivationCache(a.cache)
        x = cache.read(0, len(cache))[:, a.layer_index] * cache.scale[a.layer_index]
    else:
        from support import synthetic
        g = torch.Generator().manual_seed(0)
        data = synthetic.make_toy_data(d=576, n_layers=1, n_atoms=8192, density=32 / 8192, noise=0.05)
        x = data.sample(a.tokens, g)[:, 0]
        x = x * (x.shape[1] / x.pow(2).sum(-1).mean()).sqrt()
    if len(x) <= a.eval_tokens + a.batch:
        raise ValueError(f"{len(x)} tokens are too few for --eval-tokens {a.eval_tokens} plus one batch of {a.batch}")
    return x[:-a.eval_tokens].contiguous(), x[-a.eval_tokens:].contiguous()


def batch_stream(x_ND: torch.Tensor, batch: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """The same list of batches for every implementation: seeded epochs of shuffled indices."""
    g, out = torch.Generator().manual_seed(seed), []
    while len(out) < steps:
        perm = torch.randperm(len(x_ND), generator=g)
        out += [x_ND[perm[i:i + batch]] for i in range(0, len(perm) - batch + 1, batch)]
    return out[:steps]


@torch.no_grad()
def fvu(recon_fn, x_ND: torch.Tensor, device, chunk: int = 4096) -> float:
    num, mean = 0.0, x_ND.mean(0)
    for i in range(0, len(x_ND), chunk):
        xb = x_ND[i:i + chunk].to(device)
        num += (xb - recon_fn(xb)).pow(2).sum().item()
    return num / (x_ND - mean).pow(2).sum().item()


# ----------------------------------------------------------------------------------------
# The three implementations: each returns (step(x) -> None, recon(x) -> x̂, eval_mode())
# ----------------------------------------------------------------------------------------


def ours(a, first_batch, fused_adam=False):
    """sae.SAE with TopK (as SAELens's TopKTrainingSAE; the library's default is BatchTopK) stepped by
    train.py's step, with train.py's Adam, or with Adam(fused=True)."""
    m = sae.SAE(sae.SAEConfig(d_in=first_batch.shape[1], n_latents=a.n_latents, k=a.k, sparsity="topk",
                              dead_tokens=a.dead_steps * a.batch)).to(a.device)
    m.init_b_dec(first_batch.to(a.device), "median")
    opt = torch.optim.Adam(m.parameters(), lr=a.lr, betas=(0.9, 0.999), fused=fused_adam)

    def step(x):   # train.py's step
        core.train_step(m, opt, x).loss.item()
    return step, lambda x: m(x).recon, m.eval


def saelens(a, first_batch, **options):
    """SAELens with its defaults, or with TopKTrainingSAEConfig `options` changed."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    cfg = TopKTrainingSAEConfig(d_in=first_batch.shape[1], d_sae=a.n_latents, k=a.k, dtype="float32",
                                device=a.device, normalize_activations="none", **options)
    model = TopKTrainingSAE(cfg)
    trainer = SAETrainer(cfg=SAETrainerConfig(total_training_samples=(a.steps + a.warmup) * a.batch,
                                              train_batch_size_samples=a.batch, lr=a.lr, lr_end=a.lr, device=a.device,
                                              dead_feature_window=a.dead_steps),
                         sae=model, data_provider=iter(()))
    model.to(a.device)

    def step(x):   # the body of SAETrainer.fit's loop, without the wandb logging and progress bar
        out = trainer.step(x)
        trainer.n_training_steps += 1
        out.loss.item()
    return step, lambda x: model(x), model.eval


def dictionary_learning(a, first_batch):
    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer

    d = first_batch.shape[1]
    trainer = TopKTrainer(steps=a.steps + a.warmup, activation_dim=d, dict_size=a.n_latents, k=a.k, layer=0,
                          lm_name="bench", lr=a.lr, warmup_steps=0, decay_start=None, device=a.device,
                          dict_class=AutoEncoderTopK)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    trainer.dead_feature_threshold = a.dead_steps * a.batch
    state = {"step": 0}

    def step(x):
        loss = trainer.update(state["step"], x)
        state["step"] += 1
        float(loss)
    return step, lambda x: trainer.ae(x), trainer.ae.eval


IMPLS = {
    "ours (sae.py, TopK)": ours,
    "ours (sae.py, TopK), Adam(fused=True)": partial(ours, fused_adam=True),
    "SAELens (TopKTrainingSAE)": saelens,
    "SAELens, rescale_acts_by_decoder_norm=False": partial(saelens, rescale_acts_by_decoder_norm=False),
    "SAELens, rescale_acts_by_decoder_norm=False, use_sparse_activations=True": partial(
        saelens, rescale_acts_by_decoder_norm=False, use_sparse_activations=True),
    "dictionary_learning": dictionary_learning,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", default=None, help="activation cache folder (activation_cache.build_cache); "
                                                 "default: synthetic toy data")
    p.add_argument("--layer-index", type=int, default=0, help="which of the cache's layers")
    p.add_argument("--tokens", type=int, default=60_000, help="synthetic tokens (without --cache)")
    p.add_argument("--eval-tokens", type=int, default=8_192)
    p.add_argument("--n-latents", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (they train too)")
    p.add_argument("--dead-steps", type=int, default=1000, help="steps without firing before a latent is dead")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--skip", default="", help="comma list of implementations to leave out")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a shared "
                                                          "machine fewer threads than cores avoids spin-wait collapse")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x_train, x_eval = load_data(a)
    batches = batch_stream(x_train, a.batch, a.warmup + a.steps)
    print(f"data: {'cache ' + a.cache if a.cache else 'synthetic'}; {len(x_train):,} train and "
          f"{len(x_eval):,} held-out tokens, d {x_train.shape[1]}; F {a.n_latents}, k {a.k}, batch {a.batch}, "
          f"lr {a.lr}, {a.warmup} + {a.steps} steps, device {a.device}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    impls = {}
    for name, build in IMPLS.items():
        if name in a.skip.split(","):
            continue
        try:
            torch.manual_seed(0)
            impls[name] = build(a, batches[0])
        except ImportError as e:
            print(f"{name}: not installed here ({e}); skipped")
    times = {name: 0.0 for name in impls}
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    for i, xb in enumerate(batches):
        xb = xb.to(a.device)
        for name, (step, _, _) in impls.items():   # interleaved: one step of each in turn
            sync()
            t = time.perf_counter()
            step(xb)
            sync()
            if i >= a.warmup:
                times[name] += time.perf_counter() - t
    print(f"\n| implementation | tokens/s | ms/step | held-out FVU after {a.warmup + a.steps} steps |")
    print("|---|---:|---:|---:|")
    for name, (_, recon, eval_mode) in impls.items():
        eval_mode()
        f = fvu(recon, x_eval, a.device)
        print(f"| {name} | {a.steps * a.batch / times[name]:,.0f} | {1e3 * times[name] / a.steps:,.1f} | {f:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
