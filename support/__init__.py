"""Support code for the entry points (train.py, metrics.py, probe.py, latents/): run folders and saving by
a registered name (runs), files written whole (files), the command-line plumbing (cli), the activation
cache (cache), training batches (batches), text corpora (corpora), probing tasks (tasks), torchrun
(distributed) and toy data with known atoms (synthetic). Nothing here imports a model file."""
