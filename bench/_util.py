"""Small helpers shared by the bench modules: event loop, CPU pinning, free ports."""
from __future__ import annotations

import asyncio
import os
import socket


def run(coro):
    """Run a coroutine on uvloop when available, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def pin(pid: int, cpus) -> bool:
    """Pin a process (0 = this one) to a set of CPU ids; False when not possible."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(pid, set(cpus))
        return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
