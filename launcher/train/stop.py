"""The stop flag: SIGTERM / SIGUSR2 (Slurm's warning before the time limit, preemption) or a first Ctrl-C only set it;
the training loop agrees on it across ranks at the next step boundary, all ranks save together and the job exits with
``launcher.rundir.EXIT_REQUEUE``."""

from __future__ import annotations

import signal
from typing import Any, Callable, Dict, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)

_stop: Dict[str, Any] = {"requested": False, "signal": None}


def request_stop(reason: str = "request_stop()") -> None:
    """Ask the loop to save and stop at the next step boundary (safe to call from a signal handler)."""
    _stop["requested"] = True
    _stop["signal"] = _stop["signal"] or reason


def stop_requested() -> bool:
    return bool(_stop["requested"])


def stop_reason() -> Optional[str]:
    return _stop["signal"]


def clear_stop() -> None:
    _stop["requested"] = False
    _stop["signal"] = None


def _on_signal(signum: int, _frame: Any) -> None:
    if signum == signal.SIGINT and _stop["signal"] == "SIGINT":
        raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
    request_stop(signal.Signals(signum).name)


def install_signal_handlers() -> Callable[[], None]:
    """SIGTERM, SIGUSR2 and a first SIGINT (Ctrl-C) only set the stop flag; a second Ctrl-C interrupts.

    Returns a function that restores the previous handlers.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {sig: signal.signal(sig, _on_signal) for sig in (*STOP_SIGNALS, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    return restore

