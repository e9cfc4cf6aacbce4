"""Processes the bench starts: start pinned, measure (CPU seconds, RSS in MB), stop by PID."""
from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import psutil


class Skip(Exception):
    """A target that cannot run here; the message is the note shown in the report."""


class Proc:
    """One started process (and the children it forks), pinned to ``cpus``."""

    def __init__(self, name: str, argv: list[str], cpus=None, env: dict | None = None, cwd: str | None = None,
                 log: str | None = None):
        self.name, self.argv, self.cpus, self.log = name, argv, cpus, log
        cpus = set(cpus) if cpus else None
        logf = open(log, "ab") if log else subprocess.DEVNULL

        def pre():
            if cpus and hasattr(os, "sched_setaffinity"):
                try:
                    os.sched_setaffinity(0, cpus)
                except OSError:
                    pass

        self.popen = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env=env, cwd=cwd, preexec_fn=pre, start_new_session=True)
        if log:
            logf.close()
        self.pid = self.popen.pid
        self.ps = psutil.Process(self.pid)
        self._known: dict[int, psutil.Process] = {self.pid: self.ps}

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[psutil.Process]:
        """This process and its live descendants (remembered, so that stop() can reach them)."""
        try:
            kids = self.ps.children(recursive=True)
        except psutil.Error:
            kids = []
        for k in kids:
            self._known.setdefault(k.pid, k)
        return [self.ps] + kids

    def cpu_s(self) -> float:
        """User + system CPU seconds of the tree so far (reaped children included)."""
        total = 0.0
        for p in self.tree():
            try:
                t = p.cpu_times()
                total += t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
            except psutil.Error:
                pass
        return total

    def rss_mb(self) -> float:
        """Resident memory of the tree now (MB)."""
        total = 0
        for p in self.tree():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def hwm_mb(self) -> float:
        """Sum over the tree of each process's peak resident memory, VmHWM (MB)."""
        total = 0
        for p in self.tree():
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            total += int(line.split()[1]) * 1024
            except OSError:
                pass
        return total / 2**20

    def log_tail(self, n: int = 15) -> str:
        if not self.log or not os.path.exists(self.log):
            return ""
        with open(self.log, "rb") as f:
            return b"\n".join(f.read().splitlines()[-n:]).decode("utf-8", "replace")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM the process, then SIGKILL what is left of it and of its known children, by PID."""
        self.tree()
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        for pid, p in self._known.items():
            if pid == self.pid:
                continue
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass


def wait_http(url: str, proc: Proc, timeout_s: float, headers: dict | None = None, want: int = 200) -> None:
    """Poll ``url`` until it answers ``want``; raise Skip when the process dies or time runs out."""
    end = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < end:
        if not proc.alive():
            raise Skip(f"{proc.name} exited with code {proc.popen.returncode}: {proc.log_tail(5)}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=2) as r:
                if r.status == want:
                    return
                last = f"HTTP {r.status}"
        except Exception as e:  # noqa: BLE001 -- any failure means "not ready yet"
            last = str(e)[:120]
        time.sleep(0.05)
    raise Skip(f"{proc.name} not ready after {timeout_s:g} s ({last}): {proc.log_tail(5)}")
