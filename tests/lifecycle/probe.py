"""What the lifecycle tests ask from inside a network namespace (``ip netns exec NS python -m
tests.lifecycle.probe ...``): a socket belongs to the namespace of the process that opens it, so a probe of
the app's loopback runs in the app's namespace, and a probe "from the network" in the peer namespace.
Each command prints one JSON document.

* ``answers URL --while-pid PID``: waits until ``POST URL/predict`` answers 200 (or PID has exited, or
  ``--timeout`` has passed: a bound on a hang, not a measurement); prints the status it got last.
* ``listening``: the listening TCP sockets of this namespace: address, port, socket inode.
* ``scan HOST PORT...``: for each port, whether a TCP connection is accepted and, if so, what the app's
  calls get there: ``GET /models`` and ``POST /predict`` over HTTP, and ``ModelInfer`` over gRPC.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

PREDICT = {"model_id": "alpha", "input_data": "hello world"}


def answers(url: str, while_pid: int, timeout_s: float) -> dict:
    import httpx

    deadline, last = time.monotonic() + timeout_s, None
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < deadline and os.path.exists(f"/proc/{while_pid}"):
            try:
                last = client.post(f"{url}/predict", json=PREDICT).status_code
            except httpx.HTTPError as e:
                last = type(e).__name__
            if last == 200:
                break
            time.sleep(0.5)
    return {"status": last}


def listening() -> list[dict]:
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] != "0A":  # LISTEN
                    continue
                hex_ip, hex_port = fields[1].rsplit(":", 1)
                raw = bytes.fromhex(hex_ip)
                # /proc/net/tcp* holds each 32-bit word of the address in the host's byte order (little endian)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                address = str(ipaddress.ip_address(raw))
                found.append({"address": address, "port": int(hex_port, 16), "inode": int(fields[9])})
    return found


def _http(host: str, port: int) -> dict:
    import httpx

    out = {}
    with httpx.Client(timeout=3) as client:
        for name, request in (
            ("models", lambda: client.get(f"http://{host}:{port}/models")),
            ("predict", lambda: client.post(f"http://{host}:{port}/predict", json=PREDICT)),
        ):
            try:
                out[name] = request().status_code
            except httpx.HTTPError as e:
                out[name] = type(e).__name__
    return out


def _grpc(host: str, port: int) -> dict:
    import numpy as np
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    text = triton.InferInput("text", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hello world"], dtype=object))
    try:
        client = triton.InferenceServerClient(f"{host}:{port}")
        client.infer("alpha", [text], headers={"application": "multimodel"}, client_timeout=5)
        return {"infer": "OK", "details": ""}
    except InferenceServerException as e:
        return {"infer": str(e.status()).removeprefix("StatusCode."), "details": e.message()[:200]}
    except Exception as e:  # a server that is not gRPC at all
        return {"infer": type(e).__name__, "details": str(e)[:200]}


def _scan_one(host: str, port: int) -> dict:
    result: dict = {"port": port}
    try:
        with socket.create_connection((host, port), timeout=2):
            result["tcp"] = "open"
    except OSError as e:
        result["tcp"] = type(e).__name__
        return result
    result.update(_http(host, port))
    result.update(_grpc(host, port))
    return result


def scan(host: str, ports: list[int]) -> list[dict]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda p: _scan_one(host, p), ports))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.lifecycle.probe")
    commands = parser.add_subparsers(dest="command", required=True)
    a = commands.add_parser("answers")
    a.add_argument("url")
    a.add_argument("--while-pid", type=int, required=True)
    a.add_argument("--timeout", type=float, default=300)
    commands.add_parser("listening")
    s = commands.add_parser("scan")
    s.add_argument("host")
    s.add_argument("ports", type=int, nargs="*")
    args = parser.parse_args(argv)
    if args.command == "answers":
        out = answers(args.url, args.while_pid, args.timeout)
    elif args.command == "listening":
        out = listening()
    else:
        out = scan(args.host, args.ports)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
