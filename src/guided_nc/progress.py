"""Progress a user can see: a tqdm bar on a terminal, log lines in a log file or cluster job.

:class:`Progress` is what ``train``, ``compare`` and ``ufm`` report through. On a terminal
(stderr is a TTY) it draws a tqdm bar whose postfix shows the latest loss and accuracy. Anywhere
else (stdout/stderr redirected to a file, a SLURM job) a bar is useless, so it writes one line
through :mod:`logging` (logger ``"guided_nc"``) at every :meth:`Progress.log` call: for
training, once per epoch; for the UFM, every ``log_every`` iterations. The command line sets up
a handler (``guided_nc.cli``); a library user gets the lines once they configure logging.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["LOGGER", "Progress", "format_metrics"]

#: The package's logger.
LOGGER = logging.getLogger("guided_nc")


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 0.4123 acc 87.20 %``-style text of a dict of numbers (None skipped)."""
    parts = []
    for key, value in metrics.items():
        if value is None:
            continue
        if key in ("acc", "acc1", "train_acc1", "test_acc1"):
            parts.append(f"{key} {value:.2f} %")
        elif isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " ".join(parts)


class Progress:
    """A progress bar on a terminal, log lines elsewhere; silent when disabled.

    Args:
        total: steps in all.
        description: what is running (e.g. ``"implicit seed 0"``).
        enabled: False shows nothing (e.g. ``--no-progress``, or a rank other than 0).
        initial: steps already done (a resumed run).
        unit: the step's name in the bar.
        terminal: force the terminal (True) or log (False) behaviour; None = stderr.isatty().
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool = True,
        initial: int = 0,
        unit: str = "step",
        terminal: bool | None = None,
    ) -> None:
        self.total, self.description, self.enabled = total, description, enabled
        self.count = initial
        self.started = time.perf_counter()
        self._started_count = initial
        self._bar = None
        if terminal is None:
            terminal = sys.stderr.isatty()
        if enabled and terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc=description, unit=unit, dynamic_ncols=True
            )

    def update(self, steps: int = 1) -> None:
        """Advance by ``steps``."""
        self.count += steps
        if self._bar is not None:
            self._bar.update(steps)

    def log(self, prefix: str = "", **metrics: Any) -> None:
        """Show the latest numbers: the bar's postfix, or one log line with elapsed time."""
        if not self.enabled:
            return
        text = format_metrics(metrics)
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
            return
        elapsed = time.perf_counter() - self.started
        rate = (self.count - self._started_count) / elapsed if elapsed > 0 else 0.0
        head = f"{self.description}: {prefix + ' ' if prefix else ''}step {self.count}/{self.total}"
        LOGGER.info("%s %s %.1f s (%.2f steps/s)", head, text, elapsed, rate)

    def close(self) -> None:
        """Close the bar (if any)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
