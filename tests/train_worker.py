"""train.py instrumented for tests (not a test itself): tests/test_distributed.py runs it under
torchrun, tests/test_runs.py as a plain subprocess.

    [torchrun ...] tests/train_worker.py TRAIN_FLAGS...

Environment:
  FMX_DUMP=DIR           every rank saves its final models' state dicts to DIR/rank<r>.pt, and the
                         layer masks it drew (sum of the keep mask per step) to DIR/masks<r>.pt
  FMX_SIGINT_AT=STEP     rank 0 sends itself SIGINT when step STEP starts (Ctrl-C on one rank)
  FMX_HANG_AFTER_CHECKPOINT=1   the process stops (sleeps for ever) right after writing its first
                         checkpoint, so a test can kill -9 it at a known point of the run
"""
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import crosscoder  # noqa: E402
from support import runs  # noqa: E402
import train  # noqa: E402

dump = os.environ.get("FMX_DUMP")
rank = int(os.environ.get("RANK", "0"))
masks = []

if dump:
    real_agree, real_mask = train.assert_ranks_agree, crosscoder.mask_layers

    def agree(models, ranks):
        torch.save({str(k): {n: t.clone() for n, t in m.state_dict().items()} for k, m in models.items()},
                   Path(dump) / f"rank{ranks.rank}.pt")
        torch.save(masks, Path(dump) / f"masks{ranks.rank}.pt")
        return real_agree(models, ranks)

    def mask(x_BLD, p):
        out = real_mask(x_BLD, p)
        masks.append((out == 0).all(-1).sum().item())
        return out

    train.assert_ranks_agree, crosscoder.mask_layers = agree, mask

if os.environ.get("FMX_SIGINT_AT") and rank == 0:
    at, real_lr = int(os.environ["FMX_SIGINT_AT"]), train.get_lr

    def lr(step, cfg, total):
        if step == at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(step, cfg, total)

    train.get_lr = lr

if os.environ.get("FMX_HANG_AFTER_CHECKPOINT"):
    real_save = runs.RunFolder.save_checkpoint

    def save_then_hang(self, state):
        real_save(self, state)
        while True:
            signal.pause()

    runs.RunFolder.save_checkpoint = save_then_hang

sys.exit(train.main(sys.argv[1:]))
