"""Where the app's time goes under load: py-spy samples of its proxy, ingress and worker processes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import cpu, loadgen
from bench.scenarios import Run
from serve_app.launch import descendants

# Innermost frames of threads that wait in C (select, futex) with no deeper Python frame.
WAITING_FRAMES = (
    "Thread.run",
    "Worker.main_loop",
    "_run_router_event_loop",
    "_run_user_code_event_loop",
    "_worker (concurrent/futures/thread.py",
    "_WorkItem.run",
    "BaseEventLoop.run_forever",
    "Thread._bootstrap_inner",
)


def profile_load(url: str, root: int, clients: int = 16, seconds: float = 10.0) -> tuple[dict, dict]:
    """py-spy samples of the proxy, ingress and worker processes of the app below ``root`` (the ``serve run``
    this run started: not another app's on the same machine) while `clients` clients send requests for one
    model (the load generator's, for `seconds` and 3 more around the samples): how busy each process is and
    where its time goes (top functions by samples, idle excluded). Also returns the load's figures, the
    generator's CPU per request among them."""

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    procs = {
        "proxy": lambda title: title.startswith("ray::ProxyActor"),
        "ingress": lambda title: cpu.serve_replica(title) == ("multimodel", "Ingress"),
        "worker": lambda title: cpu.serve_replica(title) == ("multimodel", "ModelWorker"),
    }
    below = sorted(p.pid for p in descendants(root))
    titles = {pid: cpu.title(pid) or "" for pid in below}
    pids = {}
    for name, matches in procs.items():
        found = [str(pid) for pid in below if matches(titles[pid])]
        for k, pid in enumerate(found):
            pids[f"{name} {k + 1}" if len(found) > 1 else name] = pid
    body = json.dumps({"model_id": "sentiment", "input_data": "This movie was great!"}).encode()
    request = loadgen.Request("POST", "/predict", body, ("model_id", "sentiment"))
    plan = loadgen.Plan(url, [[request] for _ in range(clients)], duration_s=seconds + 3)
    loaded: list[loadgen.Result] = []
    loader = threading.Thread(target=lambda: loaded.append(loadgen.run_http(plan)))
    loader.start()
    time.sleep(1)  # every client connected and sending

    rate = 100
    outputs, recorders = {}, []
    for name, pid in pids.items():
        outputs[name] = Path(tempfile.mkstemp(suffix=".txt")[1])
        recorders.append(
            subprocess.Popen(
                [
                    pyspy,
                    "record",
                    "-p",
                    pid,
                    "-d",
                    str(int(seconds)),
                    "-r",
                    str(rate),
                    "-f",
                    "raw",
                    "-o",
                    str(outputs[name]),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for r in recorders:
        r.wait(timeout=seconds + 60)
    loader.join()
    result = {}
    for name, path in outputs.items():
        counts: dict[str, int] = {}
        busy = 0
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not stack or not n.isdigit():
                continue
            leaf = stack.split(";")[-1]
            if any(w in leaf for w in WAITING_FRAMES):
                continue  # a thread parked in its event loop or pool: waiting, not working
            counts[leaf] = counts.get(leaf, 0) + int(n)
            busy += int(n)
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
        result[name] = {
            "busy": busy / (rate * seconds),
            "samples": busy,
            "top": [(frame, n / busy if busy else 0.0) for frame, n in top],
        }
    if not loaded:
        raise RuntimeError("the profile's load generator failed")
    return result, Run.of(loaded[0]).summary()
