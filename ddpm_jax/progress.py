"""Progress a person can watch: tqdm bars on a terminal, the usual log lines everywhere else.

A bar shows only on process 0 with stderr on a terminal; in CI, log files and on other hosts
nothing changes. While a bar is open, log lines print above it instead of through it. Bars are
fed from host-side counters and values the caller already has: they never wait on a device.
`TQDM_DISABLE=1` turns them off (tqdm reads TQDM_* variables).
"""

from __future__ import annotations

import logging
import sys
import time

import jax
from tqdm import tqdm


def on_terminal() -> bool:
    return jax.process_index() == 0 and sys.stderr.isatty()


class _AboveBars:
    """A stream for log handlers that prints through tqdm.write: above the bars, not over them."""

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.write(text.rstrip("\n"), file=sys.stderr)

    def flush(self) -> None:
        sys.stderr.flush()


class _Bar:
    """A tqdm bar with the console log handlers redirected above it until `close`."""

    def __init__(self, **tqdm_kwargs):
        self.bar = tqdm(dynamic_ncols=True, file=sys.stderr, **tqdm_kwargs)
        self._redirected = []
        for handler in logging.getLogger().handlers:
            handler = getattr(handler, "python_handler", handler)  # absl wraps a StreamHandler
            if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout,
                                                                                  sys.stderr):
                self._redirected.append((handler, handler.setStream(_AboveBars())))

    def close(self) -> None:
        for handler, stream in self._redirected:
            handler.setStream(stream)
        self._redirected = []
        self.bar.close()


class TrainingProgress:
    """Step / total, ETA, the last logged loss and images/s; does nothing off a terminal."""

    def __init__(self, num_steps: int, start_step: int, batch_size: int):
        self.batch_size = batch_size
        self._bar = (_Bar(total=num_steps, initial=start_step, unit="step", desc="train")
                     if on_terminal() else None)

    def advance(self, steps: int) -> None:
        if self._bar is not None:
            self._bar.bar.update(steps)

    def show_loss(self, loss: float) -> None:
        """At log steps: the loss of the window just fetched (one log step late)."""
        if self._bar is not None:
            rate = self._bar.bar.format_dict.get("rate") or 0.0  # steps/s, smoothed by tqdm
            self._bar.bar.set_postfix_str(f"loss={loss:.4f}, {rate * self.batch_size:.1f} img/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ImageProgress:
    """Images drawn so far: a bar on a terminal, else one log line per update."""

    def __init__(self, total: int, desc: str = "sample", verb: str = "Sampled"):
        self.total, self.verb, self._t0 = total, verb, time.time()
        self._bar = _Bar(total=total, unit="img", desc=desc) if on_terminal() else None

    def update(self, done: int) -> None:
        if self._bar is not None:
            self._bar.bar.update(done - self._bar.bar.n)
            return
        rate = done / max(time.time() - self._t0, 1e-9)
        logging.info("%s %d/%d images (%.1f img/s, ETA %.0f s).", self.verb, done, self.total,
                     rate, (self.total - done) / rate)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
