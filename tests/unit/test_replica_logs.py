"""What a replica writes to its log (serve_app/core/logs.py): tracebacks as Python prints them, though Serve has
replaced ``print`` in the replica."""

import builtins
import inspect
import io
import logging
import traceback

from serve_app.core import ray_internals


def _printed_traceback() -> str:
    try:
        raise ValueError("boom")
    except ValueError as e:
        out = io.StringIO()
        traceback.print_exception(e, file=out)  # as logging formats an exception it logs
        return out.getvalue()


def test_a_traceback_in_a_replica_reads_as_python_prints_it_and_prints_still_reach_serves_log(monkeypatch):
    serves = ray_internals.serves_replica_print()
    serves_module = inspect.getmodule(serves)  # Serve's logging module, which installs it again on a config change
    monkeypatch.setattr(serves_module, "redirected_print", serves)
    monkeypatch.setattr(builtins, "print", serves)  # what Serve sets in each replica
    assert _printed_traceback().startswith("('Traceback (most recent call last):\\n',)")  # Serve's: one tuple a line
    ray_internals.print_to_files_as_print_does()
    fixed = builtins.print
    assert serves_module.redirected_print is fixed  # what Serve installs after a logging_config change
    assert _printed_traceback().startswith("Traceback (most recent call last):\n  File ")
    assert _printed_traceback().endswith("ValueError: boom\n")

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    serve_logger = logging.getLogger("ray.serve")
    serve_logger.addHandler(handler)
    monkeypatch.setattr(serve_logger, "level", logging.INFO)
    try:
        print("hello", 2, sep=", ")  # to stdout: Serve's logger, naming the line that printed, as Serve's print does
    finally:
        serve_logger.removeHandler(handler)
    assert [(r.getMessage(), r.filename) for r in records] == [("hello, 2\n", "test_replica_logs.py")]
    ray_internals.print_to_files_as_print_does()
    assert builtins.print is fixed  # once is enough: a print already replaced is left as it is
