"""Support code for the entry points (train.py, metrics.py, probe.py, latents/): the plumbing below the concept
files and the run-level code above some of them; README.md ("Files") lists each module and what imports what.
Nothing here imports a model file (support/kinds.py names them; they are imported by name when loaded)."""
