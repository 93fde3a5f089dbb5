"""Stopping a run on a signal: SIGINT (Ctrl-C) or SIGTERM (what `ray job stop`, Kubernetes and Slurm
send). The first one asks the run to stop after the steps in flight, with a checkpoint where
output_dir is set; a second one, or one while no epoch loop is running, interrupts at once."""

from __future__ import annotations

import signal
import threading
from typing import Optional

from ..errors import Interrupted

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}  # 128 + the signal's number, as shells report it


class StopRequest:
    """Installs the handlers for its `with` block (in the main thread only: elsewhere signals are not
    Python's to catch), and says whether a stop was asked for."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.listening = False  # an epoch loop checks `requested` between calls
        self.previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in EXIT_CODES}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():  # None: set outside Python (Ray's): the default
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _handle(self, signum: int, frame) -> None:
        if self.listening and self.signum is None:
            self.signum = signum  # the loop stops after the calls in flight
            return
        raise Interrupted(signum)
