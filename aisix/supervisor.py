"""The ``serve --workers N`` supervisor: N copies of the gateway on one port (``SO_REUSEPORT``),
kept running.

- **Start**: worker 0 first (it owns the store and upserts the config file's resources), then the
  others once it says it is ready (one byte on the pipe named by ``AISIX_READY_FD``), so no worker
  serves an empty configuration. A worker that fails to start stops the whole group (exit code
  of that worker): a bad config is an error, not something to retry.
- **A worker that dies** later (a crash, ``kill -9``, the OOM killer) is started again after a
  back-off: :data:`BACKOFF_FIRST_S`, doubling for each death in a row up to
  :data:`BACKOFF_MAX_S`, back to the first once a worker has run :data:`STABLE_S`. The others keep
  serving meanwhile: the kernel stops handing connections to a closed listener, so only the
  requests the dead worker had in flight are lost. Each death and each return is logged
  (``aisix.supervisor``), with pids.
- **SIGTERM/SIGINT** are passed on to every worker; the supervisor waits for all to drain and exit
  (no restarts from then on). Exit code: the first non-zero one of the workers' last exits, else 0.
- **SIGHUP** is passed on to worker 0, which re-reads the config file's ``models``/``apikeys`` and
  upserts them (:func:`aisix.server.lifecycle.reload_resources`); the others follow the store. No listener
  or connection is touched.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time

log = logging.getLogger("aisix.supervisor")

BACKOFF_FIRST_S = 0.5   # first restart delay, s
BACKOFF_MAX_S = 30.0    # longest restart delay, s
STABLE_S = 30.0         # a worker that ran this long before it died restarts after BACKOFF_FIRST_S, s
START_TIMEOUT_S = 120.0  # the first start of a worker must report ready within this, s
_TICK_S = 0.2


def backoff(deaths_in_a_row: int) -> float:
    """Seconds to wait before the restart that follows the ``deaths_in_a_row``-th death (1, 2, ...):
    0.5, 1, 2, 4, ... capped at :data:`BACKOFF_MAX_S`."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (deaths_in_a_row - 1))


def describe_exit(code: int) -> str:
    """``killed by SIGKILL`` for a negative Popen return code, else ``exit code 3``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    __slots__ = ("deaths", "index", "proc", "ready_fd", "restart_at", "started")

    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.ready_fd: int | None = None  # read end of the ready pipe while it starts
        self.started = 0.0                # time.monotonic() of the last start
        self.deaths = 0                   # deaths in a row (reset by a run of STABLE_S)
        self.restart_at: float | None = None


class Supervisor:
    """Runs ``n`` workers of ``python -m aisix {argv} --worker-index i``; :meth:`run` returns the exit code."""

    def __init__(self, n: int, argv: list[str]):
        self.cmd = [sys.executable, "-m", "aisix", *argv, "--worker-index"]
        self.workers = [_Worker(i) for i in range(n)]
        self.stopping: int | None = None  # the signal that asked us to stop

    # -- signals ----------------------------------------------------------------------
    def _on_stop(self, sig, _frame) -> None:
        self.stopping = sig
        for w in self.workers:
            self._signal(w, sig)

    def _on_hup(self, _sig, _frame) -> None:
        w = self.workers[0]
        # only once it is ready: before that it has no SIGHUP handler (and reads the file anyway)
        if w.ready_fd is not None or not self._signal(w, signal.SIGHUP):
            log.warning("SIGHUP: worker 0 is not serving; it reads the config file when it starts")

    @staticmethod
    def _signal(w: _Worker, sig: int) -> bool:
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(sig)
            return True
        return False

    # -- workers ------------------------------------------------------------------------
    def _spawn(self, w: _Worker) -> None:
        r, wfd = os.pipe()
        try:
            w.proc = subprocess.Popen([*self.cmd, str(w.index)], pass_fds=(wfd,),
                                      env={**os.environ, "AISIX_READY_FD": str(wfd)})
        finally:
            os.close(wfd)
        w.ready_fd, w.started, w.restart_at = r, time.monotonic(), None

    def _close_ready(self, w: _Worker) -> bool:
        """Read the ready byte (or EOF: it died first); returns whether it said ready."""
        ready = bool(os.read(w.ready_fd, 1))
        os.close(w.ready_fd)
        w.ready_fd = None
        return ready

    def _first_start(self, w: _Worker) -> bool:
        self._spawn(w)
        if select.select([w.ready_fd], [], [], START_TIMEOUT_S)[0]:
            return self._close_ready(w) and self.stopping is None
        os.close(w.ready_fd)
        w.ready_fd = None
        return False

    def _reap(self, w: _Worker, now: float) -> None:
        """A worker that exited while we were not stopping: schedule its restart."""
        code = w.proc.returncode
        ran = now - w.started
        w.deaths = 1 if ran >= STABLE_S else w.deaths + 1
        delay = backoff(w.deaths)
        log.error("worker %d (pid %d) died (%s) after %.1fs; restarting it in %.1fs (death %d in a row); "
                  "the other workers keep serving", w.index, w.proc.pid, describe_exit(code), ran, delay, w.deaths)
        if w.ready_fd is not None:
            os.close(w.ready_fd)
            w.ready_fd = None
        w.proc, w.restart_at = None, now + delay

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        if not all(self._first_start(w) for w in self.workers):
            asked_to_stop = self.stopping is not None
            self._on_stop(signal.SIGTERM, None)
            codes = [w.proc.wait() for w in self.workers if w.proc is not None]
            return 0 if asked_to_stop else next((c for c in codes if c), 1)
        print(f"aisix: all {len(self.workers)} workers ready "
              f"(pids {', '.join(str(w.proc.pid) for w in self.workers)})", flush=True)
        while self.stopping is None:
            self._tick()
        return self._drain()

    def _tick(self) -> None:
        starting = [w.ready_fd for w in self.workers if w.ready_fd is not None]
        readable = set(select.select(starting, [], [], _TICK_S)[0]) if starting else set()
        if not starting:
            time.sleep(_TICK_S)
        now = time.monotonic()
        for w in self.workers:
            if self.stopping is not None:
                return
            if w.ready_fd is not None and w.ready_fd in readable and self._close_ready(w):
                log.warning("worker %d is back (pid %d)", w.index, w.proc.pid)
            if w.proc is not None and w.proc.poll() is not None:
                self._reap(w, now)
            elif w.proc is None and w.restart_at is not None and now >= w.restart_at:
                self._spawn(w)
                log.warning("worker %d restarted (pid %d)", w.index, w.proc.pid)
                if self.stopping is not None:  # the stop signal came in while it was spawned
                    self._signal(w, self.stopping)

    def _drain(self) -> int:
        """Stopping: wait for every worker to finish its in-flight requests and exit."""
        codes = []
        for w in self.workers:
            if w.proc is not None:
                codes.append(w.proc.wait())
            if w.ready_fd is not None:
                os.close(w.ready_fd)
        return next((c for c in codes if c), 0)


def supervise(n: int, argv: list[str]) -> int:
    """Run ``n`` workers of this command and keep them running (see the module doc); returns the
    exit code for the supervisor process."""
    return Supervisor(n, argv).run()
