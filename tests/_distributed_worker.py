"""Run by tests/test_distributed.py under `accelerate launch`: the `t2edit` command itself, with every training step
made `T2EDIT_TEST_STEP_DELAY` seconds slower, so a test can kill a multi-process run between two checkpoints."""
import os
import sys
import time

from t2edit.cli import main
from t2edit.training import SVFTrainer

DELAY = float(os.environ.get("T2EDIT_TEST_STEP_DELAY", "0"))
_step = SVFTrainer.training_step


def _slow_step(self):
    metrics = _step(self)
    time.sleep(DELAY)
    return metrics


if __name__ == "__main__":
    if DELAY:
        SVFTrainer.training_step = _slow_step
    sys.exit(main(sys.argv[1:]))
