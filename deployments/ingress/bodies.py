"""Request bodies are bounded while they are parsed, not after.

A JSON body small in bytes can still hold a million values (``[[],[],...]``): parsed whole, it costs
seconds of CPU and hundreds of megabytes before any list limit is checked. ``check_json_budget`` streams
the body through a C JSON tokenizer (ijson, yajl2_c) and stops at the first value past the budget, so a
body is parsed into Python objects only once it is known to be small. Protocol adapters call it from a
thread, off the event loop.
"""

from __future__ import annotations

import ijson

from serve_app.core.errors import InvalidInput


def check_json_budget(body: bytes, max_values: int, limit_hint: str) -> None:
    """Raise InvalidInput if ``body`` holds more than ``max_values`` JSON values (scalars, lists, objects
    and keys all count). Malformed JSON is left to the full parse, which names the error."""
    count = 0
    try:
        for _ in ijson.basic_parse(body):
            count += 1
            if count > max_values:
                raise InvalidInput(
                    f"the request body holds more JSON values than {limit_hint} needs (at most {max_values})",
                    field="body",
                )
    except ijson.JSONError:
        return
