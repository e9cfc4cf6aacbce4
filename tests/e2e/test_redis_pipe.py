"""The rate limiter's Redis connection (aisix.hooks.redis_pipe.RedisPipe) against a real
redis-server: pipelined replies in order, the callback form (exactly one call per command),
NOSCRIPT answered by sending the script's text, AUTH and SELECT from the URL, an error reply
for one caller only, a server that stops answering (timeout) and one that is gone (refused),
and reconnecting after either."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
from redis.exceptions import ResponseError

from aisix.hooks.redis_pipe import PING, RedisPipe, Script, bulk, command

ECHO_N = Script("return tonumber(ARGV[1]) * 2")


def _echo(i: int) -> bytes:
    return command([bulk("ECHO"), bulk(f"m{i}")])


def _collector() -> tuple[list, object]:
    """``(calls, done)``: a ``done`` callback for RedisPipe.send that records each ``(reply, err)``."""
    calls: list = []
    return calls, lambda reply, err: calls.append((reply, err))


async def test_pipelined_replies_come_back_to_their_own_callers(redis):
    pipe = RedisPipe(redis.url, 2.0)
    try:
        replies = await asyncio.gather(*(pipe.send(_echo(i)) for i in range(200)))
        assert replies == [f"m{i}".encode() for i in range(200)]
        got: list = []
        for i in range(50):  # the callback form, mixed with futures on the same connection
            pipe.send(_echo(i), lambda reply, err, i=i: got.append((i, reply, err)))
        assert await pipe.send(PING) in (b"PONG", "PONG")  # replies in order: every callback ran before it
        assert got == [(i, f"m{i}".encode(), None) for i in range(50)]
    finally:
        await pipe.aclose()


async def test_an_error_reply_reaches_its_caller_only(redis):
    pipe = RedisPipe(redis.url, 2.0)
    try:
        await pipe.send(command([bulk("SET"), bulk("s"), bulk("text")]))
        bad = pipe.send(command([bulk("INCR"), bulk("s")]))  # not an integer
        good = pipe.send(command([bulk("INCR"), bulk("n")]))
        with pytest.raises(ResponseError, match="not an integer"):
            await bad
        assert await good == 1
    finally:
        await pipe.aclose()


async def test_a_flushed_script_is_sent_again_as_eval(redis):
    pipe = RedisPipe(redis.url, 2.0, (ECHO_N,))
    try:
        assert await pipe.send(ECHO_N.call([], [bulk(21)])) == 42
        assert redis.command("SCRIPT", "FLUSH") == b"+OK\r\n"  # the server forgets it (as after a restart)
        got, done = _collector()
        pipe.send(ECHO_N.call([], [bulk(5)]), done)
        assert await pipe.send(ECHO_N.call([], [bulk(4)])) == 8
        assert got == [(10, None)]
    finally:
        await pipe.aclose()


async def test_password_and_database_come_from_the_url(redis):
    assert redis.command("CONFIG", "SET", "requirepass", "s3cret") == b"+OK\r\n"
    url = f"redis://:s3cret@{redis.host}:{redis.port}/3"
    pipe = RedisPipe(url, 2.0)
    try:
        await pipe.send(command([bulk("SET"), bulk("where"), bulk("db3")]))
        assert b" db=3 " in await pipe.send(command([bulk("CLIENT"), bulk("INFO")]))
    finally:
        await pipe.aclose()
    wrong = RedisPipe(f"redis://:nope@{redis.host}:{redis.port}/0", 2.0)
    try:
        with pytest.raises(ConnectionError, match="WRONGPASS|invalid password"):
            await wrong.send(PING)
    finally:
        await wrong.aclose()


async def test_a_stopped_server_times_out_every_waiting_caller_then_the_pipe_reconnects(redis):
    pipe = RedisPipe(redis.url, 0.3)
    try:
        await pipe.send(PING)
        os.kill(redis.pid, signal.SIGSTOP)
        try:
            got, done = _collector()
            fut = pipe.send(PING)
            pipe.send(PING, done)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(fut, 5)
            assert len(got) == 1 and got[0][0] is None and isinstance(got[0][1], TimeoutError)
        finally:
            os.kill(redis.pid, signal.SIGCONT)
        assert await pipe.send(_echo(7)) == b"m7"  # a new connection
    finally:
        await pipe.aclose()


async def test_a_server_that_is_gone_fails_fast_and_the_pipe_comes_back_with_it(redis):
    pipe = RedisPipe(redis.url, 2.0)
    try:
        await pipe.send(PING)
        redis.stop()
        got, done = _collector()
        pipe.send(PING, done)
        for _ in range(100):  # the connection loss, then the refused reconnect: each a ConnectionError
            if got:
                break
            await asyncio.sleep(0.01)
        assert len(got) == 1 and got[0][0] is None and isinstance(got[0][1], ConnectionError)
        with pytest.raises(ConnectionError):
            await pipe.send(PING)
        redis.start()
        assert await pipe.send(_echo(3)) == b"m3"
    finally:
        await pipe.aclose()
    with pytest.raises(ConnectionError, match="closed"):
        await pipe.send(PING)
