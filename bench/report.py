"""Render a benchmark run as Markdown tables and matplotlib plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TARGETS = {
    "one": "one hot model at 16 clients: at least 2.0x the seed-style server's requests per second",
    "two": "two hot models mixed at 16 clients: at least 2.0x the seed-style server's",
    "hot": "hot-path p50 at most 1.3x the seed-style server's",
    "spread": "one model at 16 clients: the busiest worker replica at most 1.5x as busy as the least busy",
    "churn": "churn (Zipf over 8 models, 2 replicas x 2 slots): hit ratio at least one LRU of 4 slots'",
    "sim": "simulator, 1,000 models over 64 replicas x 2: hit ratio at least one global LRU's, every workload",
    "overload": "throughput at 64 clients at least 0.9x throughput at 16 (one model, and two hot models)",
}


def _f(x: Any) -> str:
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        return f"{x:.3f}" if abs(x) < 1 else f"{x:.1f}"  # seconds of a load need more than one decimal
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _rps(r: Any, peer: str, workload: str, clients: int) -> float | None:
    point = r.throughput.get(peer, {}).get(workload, {}).get(clients)
    return point["rps"] if point else None


def worker_busy(r: Any) -> list[float]:
    """How busy each worker replica was in the profile at 16 clients, busiest first."""
    return sorted((v["busy"] for k, v in r.profile.items() if k.startswith("worker")), reverse=True)


def targets(r: Any) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target; met is None where the run did not measure it."""
    out: list[tuple[str, str, bool | None]] = []

    def ratio_target(key: str, workload: str, floor: float) -> None:
        app, seed = _rps(r, "app", workload, 16), _rps(r, "seed", workload, 16)
        if app and seed:
            out.append((TARGETS[key], f"{app / seed:.2f}x ({app:.1f} against {seed:.1f} req/s)", app / seed >= floor))
        else:
            out.append((TARGETS[key], "not measured in this run", None))

    ratio_target("one", "one model", 2.0)
    ratio_target("two", "two hot models", 2.0)
    if "app" in r.hot and "seed" in r.hot:
        ratio = r.hot["app"]["p50_ms"] / r.hot["seed"]["p50_ms"]
        measured = f"{ratio:.2f}x ({r.hot['app']['p50_ms']:.1f} against {r.hot['seed']['p50_ms']:.1f} ms)"
        out.append((TARGETS["hot"], measured, ratio <= 1.3))
    busy = worker_busy(r)
    if len(busy) >= 2:
        ratio = busy[0] / max(busy[-1], 1e-9)
        shares = ", ".join(f"{100 * b:.0f} %" for b in busy)
        out.append((TARGETS["spread"], f"{ratio:.2f}x (busy {shares})", ratio <= 1.5))
    else:
        out.append((TARGETS["spread"], "not measured in this run (no profile)", None))
    if r.churn:
        c = r.churn
        gain = 100 * (c["app"]["hit_ratio"] - c["lru"]["hit_ratio"])
        to_opt = 100 * (c["belady"]["hit_ratio"] - c["app"]["hit_ratio"])
        measured = f"{100 * c['app']['hit_ratio']:.1f} %: {gain:+.1f} points on LRU, {to_opt:.1f} below Belady"
        out.append((TARGETS["churn"], measured, gain >= 0))
    if r.simulation:
        gains = {w: 100 * (v["model-aware"] - v["global LRU"]) for w, v in r.simulation["workloads"].items()}
        measured = f"{min(gains.values()):+.1f} to {max(gains.values()):+.1f} points on LRU"
        out.append((TARGETS["sim"], measured, min(gains.values()) >= 0))
    ratios = []
    for workload in ("one model", "two hot models"):
        at16, at64 = _rps(r, "app", workload, 16), _rps(r, "app", workload, 64)
        if at16 and at64:
            ratios.append((workload, at64 / at16))
    if ratios:
        measured = ", ".join(f"{w}: {x:.2f}x" for w, x in ratios)
        out.append((TARGETS["overload"], measured, min(x for _, x in ratios) >= 0.9))
    return out


WORKLOADS = ("one model", "two hot models", "mix of 3")


def _save(fig: Any, folder: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(folder / f"{name}.png", dpi=110)
    plt.close(fig)
    return f"bench/{name}.png"


def _plots(r: Any, out: Path) -> dict[str, str]:
    folder = out / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    plots = {}

    fig, ax = plt.subplots(figsize=(6, 3.5))
    peers = [p for p in ("direct", "seed", "app") if p in r.hot]
    x = range(len(peers))
    ax.bar([i - 0.2 for i in x], [r.hot[p]["p50_ms"] for p in peers], 0.4, label="p50")
    ax.bar([i + 0.2 for i in x], [r.hot[p]["p99_ms"] for p in peers], 0.4, label="p99")
    ax.set_xticks(list(x), peers)
    ax.set_ylabel("latency (ms)")
    ax.set_title("Hot path, one client, loaded model")
    ax.legend()
    plots["hot"] = _save(fig, folder, "hot_path")

    workloads = [w for w in WORKLOADS if w in r.throughput.get("app", {})]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 3.8), squeeze=False)
    for ax, workload in zip(axes[0], workloads, strict=True):
        for peer in ("seed", "app"):
            series = r.throughput.get(peer, {}).get(workload, {})
            if series:
                clients = sorted(series, key=int)
                ax.plot(clients, [series[c]["rps"] for c in clients], marker="o", label=peer)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel("requests / s")
        ax.set_title(f"Throughput, {workload}")
        ax.legend()
    plots["throughput"] = _save(fig, folder, "throughput")

    if r.churn:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        bars = [("this app", r.churn["app"]["hit_ratio"])]
        if "ray-default" in r.churn:
            bars.append(("Ray's default router", r.churn["ray-default"]["hit_ratio"]))
        bars += [
            (f"one LRU, {r.churn['slots']} slots", r.churn["lru"]["hit_ratio"]),
            ("Belady (optimal)", r.churn["belady"]["hit_ratio"]),
        ]
        ax.bar([b[0] for b in bars], [100 * b[1] for b in bars], color=[f"C{i}" for i in range(len(bars))])
        ax.set_ylabel("hit ratio (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"Model churn in the app: Zipf trace, 8 models, {r.churn['requests']} requests")
        plots["churn"] = _save(fig, folder, "churn")

    if r.simulation:
        sim = r.simulation["workloads"]
        policies = ["model-aware", "ray-default", "global LRU", "Belady"]
        fig, ax = plt.subplots(figsize=(9, 3.8))
        width = 0.2
        for k, policy in enumerate(policies):
            ax.bar(
                [i + (k - 1.5) * width for i in range(len(sim))],
                [100 * v[policy] for v in sim.values()],
                width,
                label=policy,
            )
        ax.set_xticks(range(len(sim)), list(sim), fontsize=8)
        ax.set_ylabel("hit ratio (%)")
        ax.set_ylim(0, 100)
        ax.set_title(
            f"Simulated: {r.simulation['models']} models over {r.simulation['replicas']} replicas x "
            f"{r.simulation['slots']} slots, {r.simulation['requests']} requests"
        )
        ax.legend(fontsize=8)
        plots["simulation"] = _save(fig, folder, "simulation")
    return plots


def render(r: Any, out: Path, smoke: bool) -> str:
    plots = _plots(r, out)
    m = r.machine
    parts = [
        "# Benchmarks",
        "",
        (
            "*Smoke run: a few requests per scenario on tiny models; the figures only show that the benchmark runs.*\n"
            if smoke
            else ""
        )
        + "Generated by `make bench` (`python -m bench.run`). Every peer is measured in the same run, one after the "
        "other, on the same machine; figures are percentiles and ratios. These machines are shared and noisy: "
        "compare within a run, not across runs.",
        "",
        f"Machine: {m['cpus']} CPUs, {m['memory_mib']} MiB memory, {m['platform']}. "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, Ray {m['ray']}.",
        "",
        "Peers: **direct** (the model runtime called in-process: the floor), **seed** (single-process FastAPI + "
        "uvicorn with an in-process LRU of two models, `bench/seed_server.py`), **app** (this application via "
        "`serve run` in the environment of `make run`, `config/serve.env`: throughput-optimized mode with "
        "HAProxy; 2 worker replicas x 1 torch thread, dynamic batching on, the model-aware router; "
        "`serve_config.yaml` with a fixed replica count).",
        "",
        *_generator_intro(r),
        "## Targets",
        "",
        _table(
            ["target", "measured", "met"],
            [[t, v, {True: "yes", False: "**no**", None: "n/a"}[ok]] for t, v, ok in targets(r)],
        ),
        "",
        "## 1. Hot path",
        "",
        "One client, the `sentiment` model loaded, one short sentence per request. The seed-style server and "
        "the app run at once and are measured in ten alternating rounds, so that both see the machine at the "
        "same speed (it drifts by tens of percent within a minute); the percentiles are over every request of "
        "the rounds. *direct* is measured in the benchmark's own process at its start.",
        "",
        _table(
            ["peer", "requests", "p50 (ms)", "p99 (ms)"],
            [[p, s["n"], s["p50_ms"], s["p99_ms"]] for p, s in r.hot.items()],
        ),
        "",
        f"![hot path]({plots['hot']})",
        "",
        "The fixed cost of each serving path, measured on a route that runs no model (both servers at once, "
        "in alternating rounds):",
        "",
        _table(["route", "p50 (ms)", "p99 (ms)"], [[k, v["p50_ms"], v["p99_ms"]] for k, v in r.overhead.items()]),
        "",
        "## 2. Throughput",
        "",
        "Closed loop: each client sends its next request when the last is answered. *one model*: `sentiment`; "
        "*two hot models*: `sentiment` and `spam` at random; *mix of 3*: `sentiment`, `spam` and `image` at "
        "random (three models: the seed's two-slot LRU reloads). The seed-style server and the app run at once, "
        "and each point is measured in rounds (three in `make bench`), each round on both back to back, in "
        "turns, so that both see the machine at about the same speed; req/s is the median of the rounds', the "
        "p99 over every request of the rounds.",
        "",
    ]
    rows = []
    for workload in WORKLOADS:
        for c in sorted(r.throughput.get("app", {}).get(workload, {}), key=int):
            seed = r.throughput.get("seed", {}).get(workload, {}).get(c, {})
            app = r.throughput["app"][workload][c]
            ratio = app["rps"] / seed["rps"] if seed.get("rps") else float("nan")
            rows.append(
                [
                    workload,
                    c,
                    seed.get("rps", float("nan")),
                    seed.get("p99_ms", float("nan")),
                    app["rps"],
                    app["p99_ms"],
                    ratio,
                    app["errors"] + seed.get("errors", 0),
                ]
            )
    parts += [
        _table(
            ["workload", "clients", "seed req/s", "seed p99 (ms)", "app req/s", "app p99 (ms)", "app / seed", "errors"],
            rows,
        ),
        "",
        f"![throughput]({plots['throughput']})",
        "",
    ]
    if r.protocols:
        parts += _protocols(r)
    parts += _routing(r, plots)
    parts += [
        "## Cold load",
        "",
        "Request-to-answer time for `sentiment` after it was unloaded everywhere (median), against building "
        "the same pipeline in-process (`from_pretrained`).",
        "",
        _table(
            ["", "seconds"],
            [
                ["direct load", r.cold.get("direct_load_s", float("nan"))],
                ["app: unloaded model to answer", r.cold.get("app_s", float("nan"))],
            ],
        ),
        "",
    ]
    if r.startup:
        parts += [
            "## Start-up",
            "",
            "`serve run` (a new Ray instance included) to the first successful prediction.",
            "",
            _table(
                ["", "seconds"],
                [["app", r.startup["app_s"]]] + [[f"app, {k}", v["startup_s"]] for k, v in r.variants.items()],
            ),
            "",
        ]
    if r.variants:
        parts += _knobs(r)
    parts += _generator_points(r)
    if r.profile:
        parts += [
            "## Profile at 16 clients",
            "",
            "py-spy samples (100 Hz, 10 s) of the app's processes while 16 clients send requests for one "
            "model. Samples of threads parked in an event loop or a thread pool are left out; *busy* is "
            "the share of the 10 s in which the process was working (it can pass 100 % with several "
            "threads); the frames are the innermost functions of that work, by share.",
            "",
        ]
        for proc, prof in r.profile.items():
            parts += [
                f"**{proc}**: busy {100 * prof['busy']:.0f} % ({prof['samples']} samples)",
                "",
                _table(["frame", "share"], [[f"`{frame}`", f"{100 * share:.0f} %"] for frame, share in prof["top"]]),
                "",
            ]
    if any(ok is False for _, _, ok in targets(r)):
        parts += ["## Where the time goes (targets missed)", "", *_analysis(r), ""]
    if r.notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in r.notes] + [""]
    return "\n".join(parts)


def generator_points(r: Any) -> list[tuple[str, str, dict]]:
    """(scenario, point, summary) of every point a load generator measured, in the report's order."""
    out: list[tuple[str, str, dict]] = []
    out += [("hot path", peer, s) for peer, s in r.hot.items() if s.get("generator")]
    out += [("no model run", route, s) for route, s in r.overhead.items() if s.get("generator")]
    for peer, workloads in r.throughput.items():
        for workload, series in workloads.items():
            out += [("throughput", f"{peer}, {workload}, {c} clients", s) for c, s in sorted(series.items())]
    for protocol, points in r.protocols.items():
        out += [(protocol, point, s) for point, s in points.items()]
    for name in ("app", "ray-default"):
        if r.churn and name in r.churn and "generator" in r.churn[name]:
            out.append(("churn", name, r.churn[name]))
    if "app" in r.cold:
        out.append(("cold load", "app", r.cold["app"]))
    for variant, v in r.variants.items():
        out += [("app variant", f"{variant}, {point}", v[point]) for point in ("hot", "16 clients") if point in v]
    if "profile_load" in r.generator:
        out.append(("profile load", "app, 16 clients", r.generator["profile_load"]))
    return out


def _generator_intro(r: Any) -> list[str]:
    g = r.generator
    if not g:
        return []
    points = generator_points(r)
    http = [s["cpu_ms_per_request"] for scenario, _, s in points if not scenario.startswith("gRPC")]
    grpc_ = [s["cpu_ms_per_request"] for scenario, _, s in points if scenario.startswith("gRPC")]

    def span(values: list[float]) -> str:
        values = [v for v in values if not math.isnan(v)]
        return f"{min(values):.3f} to {max(values):.3f} ms" if values else "n/a"

    text = (
        f"Load generator: **{g['http_description']}** for every HTTP figure, in processes of its own on the same "
        f"machine; it cost {span(http)} of CPU per request (its processes' CPU time over the requests sent)."
    )
    if "grpc_description" in g:
        text += f" gRPC: {g['grpc_description']}, {span(grpc_)} of CPU per request."
    return [text + " Each point's figure: *Load generator* below.", ""]


def _generator_points(r: Any) -> list[str]:
    points = generator_points(r)
    if not points:
        return []
    return [
        "## Load generator",
        "",
        "What each point cost the load generator, from its processes' CPU time (user and system) while it ran "
        "the point's rounds, over the requests it sent; the requests answered as planned (200, the model asked "
        "for) and the errors.",
        "",
        _table(
            ["scenario", "point", "generator", "sent", "answered", "errors", "CPU per request (ms)"],
            [
                [scenario, point, s["generator"], s["sent"], s["n"], s["errors"], s["cpu_ms_per_request"]]
                for scenario, point, s in points
            ],
        ),
        "",
    ]


def _protocols(r: Any) -> list[str]:
    rest = r.protocols.get("REST /predict", {})
    grpc_ = r.protocols.get("gRPC ModelInfer", {})
    parts = [
        "## gRPC and REST",
        "",
        "The app on one loaded model (`sentiment`), through each of its APIs in turn: the native REST API "
        "(`POST /predict`), the Open Inference Protocol over REST (`POST /v2/models/sentiment/infer`, JSON) "
        "and over gRPC (`ModelInfer` through Ray Serve's gRPC entry, the input in `raw_input_contents` as "
        "`tritonclient.grpc` sends it; one channel for all clients). Hot path: one client; then 16 "
        "clients in a closed loop. Each point is measured in rounds that take the protocols in turn; req/s is "
        "the median of the rounds'.",
        "",
        _table(
            ["protocol", "hot p50 (ms)", "hot p99 (ms)", "16 clients req/s", "16 clients p99 (ms)", "errors"],
            [
                [
                    name,
                    v["hot"]["p50_ms"],
                    v["hot"]["p99_ms"],
                    v["16 clients"]["rps"],
                    v["16 clients"]["p99_ms"],
                    v["hot"]["errors"] + v["16 clients"]["errors"],
                ]
                for name, v in r.protocols.items()
            ],
        ),
        "",
    ]
    if rest and grpc_:
        parts += [
            f"gRPC against the native REST API: hot-path p50 {grpc_['hot']['p50_ms'] / rest['hot']['p50_ms']:.2f}x, "
            f"throughput at 16 clients {grpc_['16 clients']['rps'] / rest['16 clients']['rps']:.2f}x.",
            "",
        ]
    return parts


def _routing(r: Any, plots: dict[str, str]) -> list[str]:
    parts = ["## Routing", ""]
    busy = worker_busy(r)
    if busy:
        parts += [
            f"**A hot model spreads.** At 16 clients on one model the worker replicas were busy "
            f"{', '.join(f'{100 * b:.0f} %' for b in busy)} of the time (profile below).",
            "",
        ]
    if r.churn:
        c = r.churn
        rows = [["this app (model-aware router)", c["app"]["loads_per_1000"], f"{100 * c['app']['hit_ratio']:.1f} %"]]
        if "ray-default" in c:
            rows.append(
                [
                    "this app with Ray's default router",
                    c["ray-default"]["loads_per_1000"],
                    f"{100 * c['ray-default']['hit_ratio']:.1f} %",
                ]
            )
        rows += [
            [
                f"simulated: one LRU of {c['slots']} slots",
                c["lru"]["loads_per_1000"],
                f"{100 * c['lru']['hit_ratio']:.1f} %",
            ],
            ["simulated: Belady (optimal)", c["belady"]["loads_per_1000"], f"{100 * c['belady']['hit_ratio']:.1f} %"],
        ]
        parts += [
            f"**Model churn in the app.** A Zipf (s = 1) trace of {c['requests']} requests over 8 tiny models, "
            f"sent one at a time to the app with {c['slots'] // 2} worker replicas of 2 slots each, against "
            f"simulations of the same trace. The app's loads are the replicas' own load counts (`GET /models`).",
            "",
            _table(["policy", "loads per 1000 requests", "hit ratio"], rows),
            "",
            f"![churn]({plots['churn']})",
            "",
        ]
    if r.simulation:
        sim = r.simulation
        rows = [
            [
                w,
                *(f"{100 * v[p]:.1f} %" for p in ("model-aware", "ray-default", "global LRU", "Belady")),
                f"{100 * (v['model-aware'] - v['global LRU']):+.1f}",
            ]
            for w, v in sim["workloads"].items()
        ]
        parts += [
            f"**At scale, simulated** (`bench/simulate.py`, the router's own `policy.rank` over per-replica LRU "
            f"caches as Ray keeps them): {sim['models']} models over {sim['replicas']} replicas of "
            f"{sim['slots']} slots, {sim['requests']} requests one at a time, 10 a second.",
            "",
            _table(["workload", "model-aware", "Ray's default", "one global LRU", "Belady", "points on LRU"], rows),
            "",
            f"![simulation]({plots['simulation']})",
            "",
        ]
    if r.spread:
        rows = [
            [
                case,
                row["model-aware"]["served"],
                f"{row['model-aware']['busiest_over_least']:.2f}",
                row["ray-default"]["served"],
                f"{row['ray-default']['busiest_over_least']:.2f}",
            ]
            for case, row in r.spread.items()
        ]
        parts += [
            "**A hot model's requests, simulated** (closed loop, one request at a time per replica, a load five "
            "times a request): requests each replica served, and the busiest over the least busy.",
            "",
            _table(["case", "model-aware: served", "ratio", "Ray's default: served", "ratio"], rows),
            "",
        ]
    return parts


def _knobs(r: Any) -> list[str]:
    base16 = r.throughput["app"]["one model"].get(16, {})
    rows = [
        ["as `make run`", r.hot["app"]["p50_ms"], base16.get("rps", float("nan")), base16.get("p99_ms", float("nan"))]
    ]
    rows += [[k, v["hot"]["p50_ms"], v["16 clients"]["rps"], v["16 clients"]["p99_ms"]] for k, v in r.variants.items()]
    return [
        "## Knobs",
        "",
        "Each variant of the app measured on the hot path and at 16 clients on one model, in "
        "this run, against the app as `make run` starts it.",
        "",
        _table(["app variant", "hot p50 (ms)", "16 clients req/s", "16 clients p99 (ms)"], rows),
        "",
    ]


def _analysis(r: Any) -> list[str]:
    """What this run's own figures say about the missed targets."""
    out = []
    overhead = {k.split(":")[0]: v["p50_ms"] for k, v in r.overhead.items()}
    if "app" in overhead and "seed" in overhead and "app" in r.hot and "direct" in r.hot:
        out.append(
            f"- **Fixed cost of the serving path.** A route that runs no model takes {overhead['app']:.1f} ms "
            f"(p50) through the app's HTTP path (HAProxy and the ingress replica) against {overhead['seed']:.1f} ms "
            f"in the single process; a prediction then crosses one more process boundary (ingress to worker, "
            f"over gRPC) and the batch queue. On the hot path the app spends "
            f"{r.hot['app']['p50_ms'] - r.hot['direct']['p50_ms']:.1f} ms over the in-process floor "
            f"({r.hot['direct']['p50_ms']:.1f} ms), the seed-style server "
            f"{r.hot['seed']['p50_ms'] - r.hot['direct']['p50_ms']:.1f} ms."
        )
    busy = worker_busy(r)
    serving = sum(v["busy"] for k, v in r.profile.items() if not k.startswith("worker"))
    if busy:
        out.append(
            f"- **Where the two CPUs go at 16 clients.** Worker replicas busy "
            f"{', '.join(f'{100 * b:.0f} %' for b in busy)}; HAProxy, the ingress and the proxy "
            f"{100 * serving:.0f} % of a CPU together. The seed-style server gives one process both CPUs with no "
            f"hop between processes."
        )
    return out
