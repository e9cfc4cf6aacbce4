"""What re-encoding a chat stream costs per chunk: ``python -m bench.encoder_cost [--rounds N]``.

Feeds recorded-shape ``chat.completion.chunk`` objects (dicts, already parsed: the SSE parse and
JSON load are the same for every encoder and left out) to
:class:`~aisix.providers.responses_chat.ResponsesEncoder` and
:class:`~aisix.providers.messages_chat.MessagesEncoder`, and prints the µs per chunk (the median of
``--rounds`` rounds, each one whole stream, ``done()`` included) for: a text answer; four tool
calls one after another (OpenAI's order); the same four calls interleaved round robin (every call
opens, then the fragments alternate, as servers streaming parallel calls do). Run it on two
checkouts (``PYTHONPATH=<checkout>``) to compare a change: the numbers are ratios' raw material,
not limits.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from aisix.providers.messages_chat import MessagesEncoder
from aisix.providers.responses_chat import ResponsesEncoder

CALLS, FRAGS, TEXT = 4, 50, 200


def _chunk(delta: dict, finish=None) -> dict:
    return {"id": "chatcmpl-b", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def _frags(k: int) -> list[str]:
    """Call ``k``'s arguments (a JSON object) cut in :data:`FRAGS` pieces."""
    s = json.dumps({"query": f"item {k} " + "lorem ipsum " * 20, "n": list(range(10))})
    step = -(-len(s) // FRAGS)
    return [s[i:i + step] for i in range(0, len(s), step)]


def _opening(k: int) -> dict:
    return _chunk({"tool_calls": [{"index": k, "id": f"call_{k}", "type": "function",
                                   "function": {"name": f"tool{k}", "arguments": ""}}]})


def _arg(k: int, f: str) -> dict:
    return _chunk({"tool_calls": [{"index": k, "function": {"arguments": f}}]})


def scenarios() -> dict[str, list[dict]]:
    """Name → the chunks of one stream (the finish chunk last)."""
    frags = [_frags(k) for k in range(CALLS)]
    sequential = [c for k in range(CALLS) for c in [_opening(k), *(_arg(k, f) for f in frags[k])]]
    rounds = max(map(len, frags))
    interleaved = [_opening(k) for k in range(CALLS)] + [
        _arg(k, frags[k][j]) for j in range(rounds) for k in range(CALLS) if j < len(frags[k])]
    return {"text": [_chunk({"content": f"word{i} "}) for i in range(TEXT)] + [_chunk({}, "stop")],
            "calls, sequential": sequential + [_chunk({}, "tool_calls")],
            "calls, interleaved": interleaved + [_chunk({}, "tool_calls")]}


def per_chunk_us(make, chunks: list[dict], rounds: int) -> float:
    """Median µs per chunk over ``rounds`` whole streams through a fresh ``make()`` encoder."""
    times = []
    for _ in range(rounds):
        enc = make()
        t0 = time.perf_counter_ns()
        for c in chunks:
            enc.chunk(c)
        enc.done()
        times.append((time.perf_counter_ns() - t0) / len(chunks) / 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=300, help="whole streams per case (median taken)")
    rounds = max(1, min(ap.parse_args().rounds, 100_000))
    encoders = [("responses", lambda: ResponsesEncoder({"model": "m", "input": "x"})), ("messages", MessagesEncoder)]
    print(f"{'stream':<22}{'chunks':>7}" + "".join(f"{n + ' µs/chunk':>20}" for n, _ in encoders))
    for name, chunks in scenarios().items():
        cells = "".join(f"{per_chunk_us(make, chunks, rounds):>20.2f}" for _, make in encoders)
        print(f"{name:<22}{len(chunks):>7}{cells}")


if __name__ == "__main__":
    main()
