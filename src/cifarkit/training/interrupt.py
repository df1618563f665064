"""Ctrl-C during training: a request honoured between two steps, so the state saved is consistent."""
from __future__ import annotations

from ..distributed import Dist


class DeferredInterrupt:
    """Turns Ctrl-C into a request honoured at the next step boundary, so the state saved on
    interrupt is always a consistent one (weights, optimiser, position and sums of the same
    step). A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = self.forced = False
        self._old = None

    def __enter__(self):
        import signal
        import threading
        # Only where Ctrl-C would raise KeyboardInterrupt anyway (not where it is ignored or
        # handled by the embedding program).
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            self.forced = True
            raise KeyboardInterrupt
        self.requested = True

    def should_stop(self, dist: Dist, step: int) -> bool:
        if not dist.enabled:
            return self.requested
        # every rank must stop at the same step: agree every 10 steps (a collective is not free)
        return step % 10 == 0 and dist.all_min(0.0 if self.requested else 1.0) < 1

    def __exit__(self, *exc):
        if self._old is not None:
            import signal
            signal.signal(signal.SIGINT, self._old)
            self._old = None


class NonFinite(Exception):
    """The loss became NaN or infinite at ``step`` (every process raises it at the same step)."""

    def __init__(self, step: int, value: float):
        self.step, self.value = step, value
