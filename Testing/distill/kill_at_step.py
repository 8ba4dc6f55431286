"""Run the fastsam3d-distill command line and die by SIGKILL (a real, unclean death) when a
given optimiser step begins: the resume tests' way to interrupt a run mid-training.

    python Testing/distill/kill_at_step.py STEP distill --out ... (the CLI's arguments)

The step arrives through the trainer's step callback (``Trainer(callbacks=...)``), added here
to every trainer the command builds; the product code holds no kill switch.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any


def kill_at(step: int) -> Any:
    """A trainer callback: SIGKILL this process as optimiser step ``step`` begins (first
    micro-batch of its accumulation window)."""

    def callback(trainer: Any) -> None:
        if trainer.opt_step + 1 == step and trainer.window_backward == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    return callback


def main(argv: list[str]) -> int:
    from fastsam3d_distill import engine
    from fastsam3d_distill.cli import main as cli_main

    step = int(argv[0])
    plain_init = engine.Trainer.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        plain_init(self, *args, **kwargs)
        self.callbacks.append(kill_at(step))

    engine.Trainer.__init__ = init  # type: ignore[method-assign]
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
