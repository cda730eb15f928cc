"""Request bodies are bounded while they are parsed, not after.

A JSON body small in bytes can still hold a million values (``[[],[],...]``): parsed whole, it costs
seconds of CPU and hundreds of megabytes before any list limit is checked. ``check_json_budget`` streams
the body through a C JSON tokenizer (ijson, yajl2_c) and stops at the first value past the budget, so a
body is parsed into Python objects only once it is known to be small. It hands the body over in reads that
double in size, so that one long string or number costs time linear in its length (``GrowingReads``). A
body the tokenizer cannot read is refused there and then (400): it is not JSON, and the full parse must
never see it, for that parse would take what the tokenizer refused (pydantic reads ``NaN`` and
``Infinity``) and run unbounded. Protocol
adapters run their parsers through ``parse_bounded``: a body of at most ``INLINE_PARSE_BYTES`` on the event
loop, a larger one in a thread, one at a time (``MAX_PARSES_AT_ONCE``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import TypeVar

import ijson
from pydantic import ValidationError

from serve_app.core.errors import InvalidInput, MalformedRequest

FIRST_READ_BYTES = 64 * 1024
"""The tokenizer's first read of a body; each read after it is twice as large as the one before."""


class GrowingReads:
    """A body handed to the tokenizer in reads that double: FIRST_READ_BYTES, then twice that, and so on. The
    tokenizer reads a token cut by the end of a read (a string, a number) again from its start at the next
    read: in reads of one size, a long token costs the square of its length (a string of 4 million escapes:
    6.5 s, holding the GIL), in doubling reads at most about twice its length, while a body of many small
    values is still refused within its first read."""

    def __init__(self, body: bytes) -> None:
        self._body, self._at, self._size = memoryview(body), 0, FIRST_READ_BYTES

    def read(self, size: int = -1) -> bytes:
        if size == 0:  # ijson's check of the source's type
            return b""
        chunk = bytes(self._body[self._at : self._at + self._size])
        self._at += len(chunk)
        self._size *= 2
        return chunk


def check_json_budget(body: bytes, max_values: int, limit_hint: str) -> None:
    """Raise InvalidInput if ``body`` holds more than ``max_values`` JSON values (scalars, lists, objects
    and keys all count), MalformedRequest if it is not JSON (``NaN``, ``Infinity``, a number of more digits
    than Python reads, trailing bytes, ...): either way while it is read (``GrowingReads``), before any full
    parse."""
    count = 0
    try:
        for _ in ijson.basic_parse(GrowingReads(body)):
            count += 1
            if count > max_values:
                raise InvalidInput(
                    f"the request body holds more JSON values than {limit_hint} needs (at most {max_values})",
                    field="body",
                )
    except InvalidInput:
        raise
    except Exception as e:  # ijson's JSONError, or what a value it cannot convert raises (SystemError, ValueError)
        reason = _yajl_reason(e) if isinstance(e, ijson.JSONError) else ""
        nan = b"NaN" in body or b"Infinity" in body  # the likely cause, named (a scan in C, once refused)
        named = " (NaN and Infinity are not JSON)" if nan else ""
        raise _not_valid_json(named + (f": {reason}" if reason else "")) from None


def _yajl_reason(e: Exception) -> str:
    """The first line of the tokenizer's error ("lexical error: invalid char in json text."): yajl's message
    goes on to quote the body around the fault, as bytes, which the client's answer does not echo."""
    message = e.args[0] if e.args else ""
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    lines = str(message).strip().splitlines()
    return lines[0][:100] if lines else ""


def _not_valid_json(detail: str) -> MalformedRequest:
    """The 400 of a body that is not JSON, whichever parser found it out: ``detail`` says what it saw."""
    return MalformedRequest(f"the request body is not valid JSON{detail}", field="body")


T = TypeVar("T")

INLINE_PARSE_BYTES = 4096
"""A body of at most this many bytes is parsed on the event loop: its cost is bounded before it runs, and
smaller than the hop to a thread and back (docs/performance.md has the figures)."""


MAX_PARSES_AT_ONCE = 1
"""Bodies over INLINE_PARSE_BYTES parsed at once, in threads, by one ingress replica; the others wait their turn
on the event loop. A parse holds the GIL, so more at once are not faster, and each holds what it builds: six of
the costliest 8 MiB gRPC messages (4 million empty tensors) at once peaked at 640 to 760 MiB over the process's
own, one after another at 120 MiB, in the same 0.6 to 0.7 s."""

_turns: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def not_json(e: ValidationError) -> MalformedRequest | None:
    """The 400 of a body that pydantic's JSON parser refuses after ``check_json_budget`` read it (a string
    with a lone high surrogate, ``"\\ud800"``, which yajl decodes and jiter does not), as for any body that
    is not JSON; None when the body is JSON and only its fields are wrong (the caller's 422)."""
    problem = next((p for p in e.errors(include_url=False) if p["type"] == "json_invalid"), None)
    if problem is None:
        return None
    return _not_valid_json(": " + str(problem["msg"]).removeprefix("Invalid JSON: "))


async def parse_bounded(parse: Callable[[bytes], T], body: bytes) -> T:
    """``parse(body)``: on the event loop for a body of at most INLINE_PARSE_BYTES, else in a thread, at most
    MAX_PARSES_AT_ONCE at a time."""
    if len(body) <= INLINE_PARSE_BYTES:
        return parse(body)
    loop = asyncio.get_running_loop()
    turn = _turns.get(loop) or _turns.setdefault(loop, asyncio.Semaphore(MAX_PARSES_AT_ONCE))
    async with turn:
        return await asyncio.to_thread(parse, body)
