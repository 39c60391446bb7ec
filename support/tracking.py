"""Following a run remotely: train.py --wandb PROJECT logs to Weights & Biases (optional dependency).

What is logged (one W&B run per train.py run; `wandb` reads WANDB_MODE, WANDB_DIR, WANDB_API_KEY as usual):
  config   train.py's whole TrainConfig and every dictionary's config (the dict config.json saves)
  history  at every progress-bar reading (--log-every steps), per dictionary NAME of the run:
               train/NAME/loss, train/NAME/L0, train/NAME/FVU, train/NAME/dead  and  train/tokens_per_s
           (support/progress.py: the same figures the bar shows), and at every --eval-every evaluation the
           curve.jsonl record: eval/KEY/fvu, mse, l0, dead_eval, dead_counter (and fc_mean, fc_median, ...
           for crosscoders/fmxcoders), KEY the curve's key ("all" or the layer, "NAME/…" in a set);
           the W&B step is the training step
  summary  summary.json's figures under final/: steps, tokens, tokens_per_s, complete, and the held-out
           final/eval/KEY/fvu, ... (on all the run's held-out tokens; eval/KEY/... is the last curve point)

Resume. The W&B run id is kept in the run folder (WANDB_FILE); train.py --resume continues that W&B run
(wandb.init(id=..., resume="allow")), so its history goes on from the resumed step.
"""
from __future__ import annotations

import json
import math
import secrets
import string
from pathlib import Path

WANDB_FILE = "wandb.json"          # {"project", "id"} of the run's W&B run, in the run folder


def require(flag: str = "--wandb") -> None:
    """ValueError (one line, at argument checking) when the optional package wandb is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError(f"{flag} needs the package wandb, which is not installed: pip install wandb") from None


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """{"a": {"b": 1}} -> {"a/b": 1.0}: the finite numbers (as floats) and booleans of nested dicts."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and (isinstance(v, bool) or math.isfinite(v)):
            out[key] = v if isinstance(v, bool) else float(v)
    return out


class Tracker:
    """One W&B run of a train.py run: `log` the bar's figures, `curve` an --eval-every record, `summary` the end."""

    def __init__(self, project: str, folder, config: dict, resume: bool):
        import wandb

        path = Path(folder) / WANDB_FILE
        earlier = json.loads(path.read_text()) if resume and path.exists() else None
        run_id = earlier["id"] if earlier else "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                                          for _ in range(8))      # W&B's id form
        self.run = wandb.init(project=project, id=run_id, resume="allow", name=Path(folder).name, config=config)
        path.write_text(json.dumps({"project": project, "id": run_id}) + "\n")

    def log(self, step: int, figures: dict[str, dict[str, float]], tokens_per_s: float) -> None:
        self.run.log({**flatten(figures, "train/"), "train/tokens_per_s": tokens_per_s}, step=step)

    def curve(self, record: dict) -> None:
        self.run.log(flatten(record["eval"], "eval/"), step=record["step"])

    def summary(self, summary: dict) -> None:
        keep = {k: summary[k] for k in ("steps", "steps_planned", "tokens", "tokens_per_s", "complete", "eval")
                if k in summary}
        self.run.summary.update(flatten(keep, "final/"))      # (W&B's own summary: each history key's last value)

    def finish(self) -> None:
        self.run.finish()
