"""Render a benchmark run as Markdown tables and matplotlib plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.cpu import ROLES

TARGETS = {
    "one": "one hot model at 16 clients: at least 2.2x the seed-style server's requests per second",
    "two": "two hot models mixed at 16 clients: at least 2.0x the seed-style server's",
    "hot": "hot-path p50 at most 1.3x the seed-style server's",
    "overhead": "serving overhead: the app's hot-path p50 minus the in-process floor's (same thread rule) at most 3 ms",
    "generator": "load generator: at most 0.5 ms of CPU per HTTP request, every point",
    "spread": "one model at 16 clients: the busiest worker replica at most 1.5x as busy as the least busy",
    "churn": "churn (Zipf over 8 models, 2 replicas x 2 slots): hit ratio at least one LRU of 4 slots'",
    "sim": "simulator, 1,000 models over 64 replicas x 2: hit ratio at least one global LRU's, every workload",
    "overload": "throughput at 64 clients at least 0.9x throughput at 16 (one model, and two hot models)",
    "sized_memory": "mixed-size fleet: no worker replica's resident memory above its budget plus baseline, plus 15 %",
    "sized_hits": "mixed-size fleet: hit ratio at least one global byte-LRU's with the same bytes and count cap",
    "sized_sim": "simulator with sizes, 1,000 models over 64 replicas: hit ratio at least one global byte-LRU's, "
    "every workload",
    "embed": "embeddings at 16 clients: at least 1.5x the sentence-transformers peer's requests per second",
    "ner": "token classification p50 at one client at most 1.3x the transformers pipeline peer's",
}


def _mb(x: Any) -> str:
    """Bytes as MB (10^6), or n/a."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / 1e6:,.1f} MB"


def _pct(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f} %"


def sized_memory(run: dict) -> tuple[float | None, float | None, float | None]:
    """(peak resident bytes of any worker replica, budget + baseline, the limit: that plus 15 %) of a fleet run."""
    m = run.get("memory", {})
    return m.get("peak_bytes"), m.get("budget_plus_baseline_bytes"), m.get("limit_bytes")


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


def _point(r: Any, peer: str, workload: str, clients: int) -> dict | None:
    return r.throughput.get(peer, {}).get(workload, {}).get(clients)


def _unanswered(*points: dict) -> int:
    """Requests of these points not answered as planned (an error, no answer): a figure with any is no measure
    of a target, whatever it comes to (its latencies are those of the requests answered, its rate counts
    those only)."""
    return sum(max(p.get("errors", 0), p.get("sent", 0) - p.get("n", p.get("sent", 0))) for p in points)


def _judged(target: str, measured: str, ok: bool, *points: dict) -> tuple[str, str, bool]:
    """A target's row: missed, whatever its figure, where a point it rests on had requests unanswered."""
    failed = _unanswered(*points)
    return (target, f"{measured}; {failed} requests unanswered", False) if failed else (target, measured, ok)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "no ratio"


def worker_busy(r: Any) -> list[float]:
    """How busy each worker replica was in the profile at 16 clients, busiest first."""
    return sorted((v["busy"] for k, v in r.profile.items() if k.startswith("worker")), reverse=True)


def targets(r: Any) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each target; met is None where the run did not measure it."""
    out: list[tuple[str, str, bool | None]] = []

    def ratio_target(key: str, workload: str, floor: float) -> None:
        app, seed = _point(r, "app", workload, 16), _point(r, "seed", workload, 16)
        if app is None or seed is None:
            out.append((TARGETS[key], "not measured in this run", None))
            return
        a, s = app["rps"], seed["rps"]
        met = bool(s) and a / s >= floor
        out.append(_judged(TARGETS[key], f"{_ratio(a, s)} ({a:.1f} against {s:.1f} req/s)", met, app, seed))

    ratio_target("one", "one model", 2.2)
    ratio_target("two", "two hot models", 2.0)
    if "app" in r.hot and "seed" in r.hot:
        app, seed = r.hot["app"], r.hot["seed"]
        ratio = app["p50_ms"] / seed["p50_ms"]
        measured = f"{ratio:.2f}x ({app['p50_ms']:.1f} against {seed['p50_ms']:.1f} ms)"
        out.append(_judged(TARGETS["hot"], measured, ratio <= 1.3, app, seed))
    if "app" in r.hot and "direct" in r.hot:
        app, direct = r.hot["app"], r.hot["direct"]
        gap = app["p50_ms"] - direct["p50_ms"]
        measured = f"{gap:.1f} ms ({app['p50_ms']:.1f} against {direct['p50_ms']:.1f} ms)"
        out.append(_judged(TARGETS["overhead"], measured, gap <= 3.0, app, direct))
    http = [s["cpu_ms_per_request"] for scenario, _, s in generator_points(r) if not scenario.startswith("gRPC")]
    http = [v for v in http if not math.isnan(v)]
    if http:
        out.append((TARGETS["generator"], f"{min(http):.3f} to {max(http):.3f} ms", max(http) <= 0.5))
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
    out += _sized_targets(r)
    out += _task_targets(r)
    ratios, points = [], []
    for workload in ("one model", "two hot models"):
        at16, at64 = _point(r, "app", workload, 16), _point(r, "app", workload, 64)
        if at16 is not None and at64 is not None:
            points += [at16, at64]
            ratios.append((workload, at64["rps"] / at16["rps"] if at16["rps"] else 0.0))
    if ratios:
        measured = ", ".join(f"{w}: {x:.2f}x" for w, x in ratios)
        out.append(_judged(TARGETS["overload"], measured, min(x for _, x in ratios) >= 0.9, *points))
    return out


def _sized_targets(r: Any) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    run = (r.sized or {}).get("app")
    if run:
        peak, limit_0, limit = sized_memory(run)
        if peak and limit:
            out.append(
                (
                    TARGETS["sized_memory"],
                    f"peak {_mb(peak)} against {_mb(limit)} ({_mb(limit_0)} + 15 %): {peak / limit_0:.2f}x budget + "
                    "baseline",
                    peak <= limit,
                )
            )
        else:
            out.append((TARGETS["sized_memory"], "not measured in this run (no budget)", None))
        sim = run.get("simulated")
        if sim:
            app, lru, gd = run["app"]["hit_ratio"], sim["global byte-LRU"]["hit_ratio"], sim["global GDSF"]["hit_ratio"]
            measured = f"{_pct(app)} against {_pct(lru)} ({100 * (app - lru):+.1f} points); GDSF {_pct(gd)}"
            out.append((TARGETS["sized_hits"], measured, app >= lru))
    if r.sized_simulation:
        w = r.sized_simulation["workloads"]
        gains = {k: 100 * (v["model-aware"]["hit_ratio"] - v["global byte-LRU"]["hit_ratio"]) for k, v in w.items()}
        gdsf = {k: 100 * (v["model-aware"]["hit_ratio"] - v["global GDSF"]["hit_ratio"]) for k, v in w.items()}
        measured = (
            f"{min(gains.values()):+.1f} to {max(gains.values()):+.1f} points on byte-LRU "
            f"({min(gdsf.values()):+.1f} to {max(gdsf.values()):+.1f} on GDSF)"
        )
        out.append((TARGETS["sized_sim"], measured, min(gains.values()) >= 0))
    return out


def _task_targets(r: Any) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []
    if not r.tasks:
        return out
    emb = r.tasks.get("embeddings", {})
    app, peer = emb.get("app", {}).get(16), emb.get("peer", {}).get(16)
    if app is not None and peer is not None:
        a, p = app["rps"], peer["rps"]
        measured = f"{_ratio(a, p)} ({a:.1f} against {p:.1f} req/s)"
        out.append(_judged(TARGETS["embed"], measured, bool(p) and a / p >= 1.5, app, peer))
    ner = r.tasks.get("ner", {})
    if "app" in ner and "peer" in ner:
        ratio = ner["app"]["p50_ms"] / ner["peer"]["p50_ms"]
        measured = f"{ratio:.2f}x ({ner['app']['p50_ms']:.1f} against {ner['peer']['p50_ms']:.1f} ms)"
        out.append(_judged(TARGETS["ner"], measured, ratio <= 1.3, ner["app"], ner["peer"]))
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

    if r.sized_simulation:
        sim = r.sized_simulation["workloads"]
        policies = [key for key, _ in SIZED_ROWS]
        fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
        width = 0.2
        for k, policy in enumerate(policies):
            at = [i + (k - 1.5) * width for i in range(len(sim))]
            axes[0].bar(at, [100 * v[policy]["hit_ratio"] for v in sim.values()], width, label=policy)
            axes[1].bar(at, [v[policy]["bytes_per_1000"] / 1e9 for v in sim.values()], width, label=policy)
        for ax, label in zip(axes, ("hit ratio (%)", "GB loaded per 1,000 requests"), strict=True):
            ax.set_xticks(range(len(sim)), list(sim), fontsize=7)
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        axes[0].set_ylim(0, 100)
        fig.suptitle(
            f"Simulated with sizes: {r.sized_simulation['models']} models over {r.sized_simulation['replicas']} "
            f"replicas, {r.sized_simulation['requests']} requests"
        )
        plots["sized_simulation"] = _save(fig, folder, "sized_simulation")
    return plots


def _in_every_run(oks: list[bool | None]) -> bool | None:
    if any(ok is False for ok in oks):
        return False
    return None if any(ok is None for ok in oks) else True


def every_run(runs: list[Any]) -> list[tuple[str, list[str], bool | None]]:
    """Each target over a series of runs, oldest first: (target, its figure in each run, met in every run).
    A target counts as met only where every run measured it and met it; missed where any run missed it, even
    if another did not measure it (None: none missed it, and some run did not measure it)."""
    rows: dict[str, list[tuple[str, bool | None]]] = {}
    for i, r in enumerate(runs):
        for target, measured, ok in targets(r):
            rows.setdefault(target, [("not measured", None)] * i).append((measured, ok))
        for cells in rows.values():
            cells.extend([("not measured", None)] * (i + 1 - len(cells)))
    return [(target, [m for m, _ in cells], _in_every_run([ok for _, ok in cells])) for target, cells in rows.items()]


def _every_run(runs: list[Any]) -> list[str]:
    if len(runs) < 2:
        return []
    return [
        f"## Targets in each of the last {len(runs)} runs",
        "",
        "The same `make bench`, run after run on the same machine, oldest first (the last is this report's); "
        "a target is met only where it holds in every run. Each run's own report: `bench/runs/run-*.json` "
        "(`python -m bench.run --render FILE --out DIR`).",
        "",
        _table(
            ["target", *[f"run {i}" for i in range(1, len(runs) + 1)], "met in every run"],
            [
                [t, *[m.split(" (")[0] for m in measured], {True: "yes", False: "**no**", None: "n/a"}[ok]]
                for t, measured, ok in every_run(runs)
            ],
        ),
        "",
    ]


def render(r: Any, out: Path, smoke: bool, runs: list[Any] | None = None) -> str:
    """The report of run ``r``; ``runs``: the earlier runs of its series, oldest first."""
    plots = _plots(r, out)
    m = r.machine
    rule = bool(r.hot.get("direct", {}).get("idle_threads"))  # runs whose lone requests took threads by measure
    parts = [
        "# Benchmarks",
        "",
        (
            "*Smoke run: a few requests per scenario on tiny models; the figures only show that the benchmark runs.*\n"
            if smoke
            else ""
        )
        + "Generated by `make bench` (`python -m bench.run --runs 3`: three full runs, this report of the last). "
        "Every peer is measured in the same run, one after the "
        "other, on the same machine; figures are percentiles and ratios. These machines are shared and noisy: "
        "compare within a run, not across runs.",
        "",
        f"Machine: {m['cpus']} CPUs, {m['memory_mib']} MiB memory, {m['platform']}. "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, Ray {m['ray']}.",
        "",
        "Peers: **direct** (the model runtime called in-process: the floor, on the threads a worker replica "
        + (
            "gives a lone request on an idle node: 2 here), "
            if not rule
            else "would give a lone request on an idle node: 1, or 2 where measured faster), "
        )
        + "**seed** (single-process FastAPI + "
        "uvicorn with an in-process LRU of two models, `bench/seed_server.py`), **app** (this application via "
        "`serve run` in the environment of `make run`, `config/serve.env`: throughput-optimized mode with "
        "HAProxy; 2 worker replicas x 1 torch thread under load, a lone request on an idle node on both CPUs"
        + (", dynamic " if not rule else " where its model measured that faster, dynamic ")
        + "batching on, the model-aware router; "
        "`serve_config.yaml` with a fixed replica count), and for the embedding and entity models **peer** "
        "(one FastAPI process serving them as their users write it: sentence-transformers' `encode`, "
        "transformers' token-classification pipeline; `bench/task_peer.py`).",
        "",
        *_generator_intro(r),
        "## Targets",
        "",
        _table(
            ["target", "measured", "met"],
            [[t, v, {True: "yes", False: "**no**", None: "n/a"}[ok]] for t, v, ok in targets(r)],
        ),
        "",
        *_every_run([*(runs or []), r]),
        "## 1. Hot path",
        "",
        "One client, the `sentiment` model loaded, one sentence per request (four of 4 to 9 words, in turn; "
        "*direct* is timed on the same four, in the same order). The seed-style server and "
        "the app run at once and are measured in ten alternating rounds, so that both see the machine at the "
        "same speed (it drifts by tens of percent within a minute); the percentiles are over every request of "
        "the rounds. *direct* is measured in the benchmark's own process "
        + ("in turn with the servers' rounds." if r.hot.get("direct", {}).get("rounds", 1) > 1 else "at its start.")
        + _direct_threads(r),
        "",
        _table(
            ["peer", "requests", "p50 (ms)", "p99 (ms)"],
            [[p, s["n"], s["p50_ms"], s["p99_ms"]] for p, s in r.hot.items()],
        ),
        "",
        f"![hot path]({plots['hot']})",
        "",
        "The fixed cost of each serving path, measured on a route that runs no model (both servers at once, "
        "in alternating rounds), and Ray Serve's own floor on this machine (`bench/serve_floor.py`: an "
        "application of the app's Serve instance, behind the same HAProxy, with none of the app's code):",
        "",
        _table(
            ["route", "p50 (ms)", "mean (ms)", "p99 (ms)"],
            [[k, v["p50_ms"], v.get("mean_ms", float("nan")), v["p99_ms"]] for k, v in r.overhead.items()],
        ),
        "",
        *_breakdown(r),
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
        *_cpu(r),
    ]
    if r.protocols:
        parts += _protocols(r)
    parts += _routing(r, plots)
    parts += _sized(r, plots)
    parts += _tasks(r)
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
    for peer, series in (r.tasks or {}).get("embeddings", {}).items():
        out += [("embeddings", f"{peer}, {c} clients", s) for c, s in sorted(series.items(), key=lambda kv: int(kv[0]))]
    for peer, s_ in (r.tasks or {}).get("ner", {}).items():
        out.append(("entities, hot path", peer, s_))
    for name in ("app", "ray-default"):
        if name in (r.sized or {}):
            out.append(("mixed-size fleet", name, r.sized[name]["app"]))
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


SIZED_ROWS = (
    ("model-aware", "the router's policy (the app's)"),
    ("ray-default", "Ray's default router"),
    ("global byte-LRU", "one global byte-LRU"),
    ("global GDSF", "one global GDSF"),
)


def _sized_row(name: str, v: dict) -> list[Any]:
    return [name, _pct(v["hit_ratio"]), _pct(v["byte_hit_ratio"]), _mb(v["bytes_per_1000"])]


def _sized(r: Any, plots: dict[str, str]) -> list[str]:
    parts: list[str] = []
    if r.sized_simulation:
        sim = r.sized_simulation
        sz = sim["sizes"]
        rows = []
        for workload, v in sim["workloads"].items():
            for key, label in SIZED_ROWS:
                rows.append([workload, *_sized_row(label, v[key])[0:]])
            rows.append([workload, "Belady, count only (a bound)", _pct(v["Belady (count)"]["hit_ratio"]), "", ""])
        parts += [
            "## Memory: models of many sizes",
            "",
            "**At scale, simulated, with sizes** (`bench/simulate.py`: `pool_run`, `byte_lru`, `gdsf`): "
            f"{sim['models']} models of log-normal sizes from {_mb(sz['low'])} to {_mb(sz['high'])} "
            f"(median {_mb(sz['median'])}, mean {_mb(sz['mean'])}; drawn independently of their popularity), "
            f"over {sim['replicas']} replicas of {sim['slots']} slots and {_mb(sim['budget_bytes'])} each (the "
            f"largest model and the smallest fit together), {sim['requests']} requests one at a time, 10 a second. "
            "The pool replays each trace through the router's own policy (`policy.rank` with each model's size, "
            "replicas with their budget); on a miss each replica evicts the victims the policy names "
            "(`policy.eviction`), as the app's replicas do when the router tells them, within its budget and its "
            "two slots. Ray's default router: a holder, else a replica with the fewest models, which evicts by LRU. "
            "The global peers are one cache with the pool's total bytes and count cap (two copies a replica, "
            "summed): byte-LRU evicts the least recently used until both fit; GDSF (Greedy-Dual-Size-Frequency, a "
            "load costing 1) the lowest priority L + requests / size. Byte hit ratio: the share of the requested "
            "bytes that were loaded already; bytes loaded per 1,000 requests: what the misses read. Belady's "
            "optimum of one cache of the same count cap bounds every policy's hit ratio.",
            "",
            _table(["workload", "policy", "hit ratio", "byte hit ratio", "bytes loaded per 1,000 requests"], rows),
            "",
        ]
        if "sized_simulation" in plots:
            parts += [f"![simulation with sizes]({plots['sized_simulation']})", ""]
    if r.sized and "app" in r.sized:
        parts += _sized_app(r)
    return parts


def _sized_app(r: Any) -> list[str]:
    sized = r.sized
    run = sized["app"]
    kinds = sized.get("kinds", {})
    by_kind: dict[str, list[str]] = {}
    for m in run["models"]:
        by_kind.setdefault(kinds.get(m, "?"), []).append(f"{m} {_mb(run['sizes'].get(m) or sized['sizes'].get(m))}")
    low, high = sized.get("window", [None, None])
    listed = "; ".join(f"{k}: {', '.join(v)}" for k, v in sorted(by_kind.items()))
    budgets = ", ".join(_mb(b) for b in run["budgets"])
    baselines = ", ".join(_mb(b) for b in run["baselines"])
    fits = all(b is not None and low <= b < high for b in run["budgets"]) if low else None
    parts = [
        "**A mixed-size fleet in the app.** "
        + (
            "Models that declare their sizes and allocate nothing (`bench/sized_runtime.py`: the smoke run's), "
            if sized.get("declared")
            else "Random-initialised BERT-shaped classifiers built offline for sizing (their weights mean nothing; "
            "a prediction reads every one of them), "
        )
        + f"by size: {listed}. A Zipf (s = 1) trace "
        f"of {run['requests']} requests, most requested first as listed ({run['distinct']} models requested), sent "
        f"one at a time to {len(run['budgets'])} worker replicas of {run['slots']} slots, `worker.memory_bytes` "
        f"{_mb(sized.get('memory_bytes'))}: budgets {budgets} (baselines {baselines}), "
        + ("which fit one large model and one small one, not one large and one medium." if fits else "")
        + ("which do **not** all fall between large + small and large + medium." if fits is False else "")
        + " Every model was unloaded first. The app's hits and bytes come from its replicas' own load counts and "
        "measured sizes; the simulated policies replay the same trace with the same sizes, the pool with the "
        "replicas' budget, the global caches with their total bytes and count cap.",
        "",
    ]
    rows = []
    for name, label in (
        ("app", "this app (model-aware router)"),
        ("ray-default", "this app with Ray's default router"),
    ):
        if name in sized:
            rows.append(_sized_row(label, sized[name]["app"]))
    sim = run.get("simulated") or {}
    for key, label in SIZED_ROWS:
        if key in sim:
            rows.append(_sized_row(f"simulated: {label}", sim[key]))
    if "Belady (count)" in sim:
        rows.append(["simulated: Belady, count only (a bound)", _pct(sim["Belady (count)"]["hit_ratio"]), "", ""])
    parts += [_table(["policy", "hit ratio", "byte hit ratio", "bytes loaded per 1,000 requests"], rows), ""]
    rows = []
    for name, label in (("app", "model-aware router"), ("ray-default", "Ray's default router")):
        if name not in sized:
            continue
        a, mem = sized[name]["app"], sized[name]["memory"]
        peak, limit_0, _ = sized_memory(sized[name])
        hwm = [p["peak_resident_bytes"] for p in mem.get("processes", []) if p.get("peak_resident_bytes")]
        reported = [v["peak_resident_bytes"] for v in mem.get("replicas", {}).values()]
        rows.append(
            [
                label,
                ", ".join(_mb(x) for x in hwm) or "n/a",
                ", ".join(_mb(x) for x in reported) or "n/a",
                _mb(limit_0),
                f"{peak / limit_0:.2f}x" if peak and limit_0 else "n/a",
                a["misses"],
                a["miss_p50_ms"],
                a["miss_p99_ms"],
                a["least_gap_ms"],
                a["hit_p50_ms"],
            ]
        )
    parts += [
        "Peak resident memory of each worker replica: its process's VmHWM (`/proc`, the peak over its life, start "
        "included) and the largest the replica itself reported (`GET /models`: `replicas[].memory.resident_bytes`, "
        "sampled every 0.25 s), against its budget plus its measured baseline (the target allows 15 % more). "
        "Misses: of each model's requests, the slowest, as many as the replicas loaded it (one client sent the "
        "trace, so each latency is known by its request); *least gap*: the smallest, over the models, of the "
        "gap between a model's fastest miss and its slowest hit, which shows how clean that split is.",
        "",
        _table(
            [
                "router",
                "peak resident (VmHWM)",
                "peak reported",
                "budget + baseline",
                "peak / (budget + baseline)",
                "misses",
                "miss p50 (ms)",
                "miss p99 (ms)",
                "least gap (ms)",
                "hit p50 (ms)",
            ],
            rows,
        ),
        "",
    ]
    counters = [(name, sized[name]["app"].get("counters", {})) for name in ("app", "ray-default") if name in sized]
    if counters:
        parts += [
            "The replicas' own counts over the trace: copies evicted because the router named them (and of those, "
            "not the least recently used), by Ray's LRU for a slot, by the replica itself to keep a load within its "
            "budget (the router did not know the model's size yet, before its first load), evicted while in use, "
            "loads that waited for memory, and loads refused as larger than the budget.",
            "",
            _table(
                ["router", *EVICTION_COUNTER_NAMES.values()],
                [[name, *(c.get(k, 0) for k in EVICTION_COUNTER_NAMES)] for name, c in counters],
            ),
            "",
        ]
    return parts


EVICTION_COUNTER_NAMES = {
    "evicted_by_router": "router's victims",
    "router_victim_not_lru": "not the LRU's",
    "evicted_by_lru": "Ray's LRU",
    "evicted_for_memory": "for memory",
    "evicted_in_use": "in use",
    "waited_for_memory": "waited",
    "refused_over_budget": "refused",
}


def _medians(m: dict) -> str:
    """An IdleThreadsReport's two medians, ``idle/own`` in ms."""
    return "/".join("n/a" if m.get(k) is None else f"{m[k]:.2f}" for k in ("idle_threads_ms", "own_threads_ms"))


def _direct_threads(r: Any) -> str:
    """How the floor chose its threads, in runs that give it the replicas' rule (none before)."""
    m = r.hot.get("direct", {}).get("idle_threads")
    if not m:
        return ""
    chose = {True: "both", False: "one", None: "both and one in turns (still in its trials)"}[m["uses_idle_threads"]]
    ms = _medians(m)
    return (
        " Like a worker replica's lone request on an idle node, it runs on both CPUs where that was measured "
        f"faster than on one (`deployments/worker/threads.py`): {ms} ms, medians of the newest, on both / on "
        f"one, and it ended on {chose}."
    )


def _lone_threads(app: dict) -> str:
    """How the app ran a lone request on an idle node: on the node's idle threads, or (runs that measured it)
    where its copy measured them faster, with each model's medians."""
    most = f"at most {app.get('most_threads', 'n/a')} in this run"
    measures = app.get("idle_threads")
    if measures is None:  # a run from before the replicas measured it
        return f"a lone request on an idle node run on the node's idle threads ({most})"

    def one(model_id: str, m: dict) -> str:
        ms = _medians(m)
        chose = {True: "idle threads", False: "own thread(s)", None: "in trials"}[m.get("uses_idle_threads")]
        return f"`{model_id}` {ms} ms an input over {m['lone_batches']} lone batches, {chose}"

    per_model = "; ".join(one(model_id, m) for model_id, m in sorted(measures.items())) or "none measured"
    return (
        "a lone request on an idle node run on the node's idle threads where its model copy measured them faster "
        f"({most}; by model, median time on the idle threads / on the replica's own: {per_model})"
    )


def _tasks(r: Any) -> list[str]:
    if not r.tasks:
        return []
    t = r.tasks
    peer_threads = t.get("peer", {}).get("torch_threads", "n/a")
    app = t.get("app", {})
    app_threads = app.get("torch_threads") or "its configured"
    emb = t.get("embeddings", {})
    rows = []
    for c in sorted(emb.get("app", {}), key=int):
        mine, peer = emb["app"][c], emb.get("peer", {}).get(c, {})
        rows.append(
            [
                c,
                peer.get("rps", float("nan")),
                peer.get("p99_ms", float("nan")),
                mine["rps"],
                mine["p99_ms"],
                mine["rps"] / peer["rps"] if peer.get("rps") else float("nan"),
                mine["errors"] + peer.get("errors", 0),
            ]
        )
    ner = t.get("ner", {})
    parts = [
        "## Tasks: embeddings and entities",
        "",
        "The `embed` (feature-extraction) and `ner` (token-classification) models against single-process servers "
        "of the same files, written as their users write them (`bench/task_peer.py`: one FastAPI process on "
        "uvicorn, a synchronous route, so FastAPI's thread pool runs concurrent requests at once): "
        "sentence-transformers' `SentenceTransformer(path).encode(texts)` for embeddings, and transformers' "
        '`pipeline("token-classification", aggregation_strategy="simple")` for entities, each request one call, '
        f"no batching across requests, on torch's default threads ({peer_threads} here). The app: "
        f"{app.get('replicas', 'its')} worker replicas of {app_threads} torch thread(s) each, requests for one "
        f"model batched together (up to 8), {_lone_threads(app)}. Both run at once; each point is measured in "
        "rounds that take them in turn.",
        "",
        _table(
            ["clients", "peer req/s", "peer p99 (ms)", "app req/s", "app p99 (ms)", "app / peer", "errors"],
            rows,
        ),
        "",
    ]
    if "app" in ner and "peer" in ner:
        parts += [
            "Token classification, one client, one sentence of a few entities per request, in ten alternating rounds:",
            "",
            _table(
                ["peer", "requests", "p50 (ms)", "p99 (ms)"],
                [
                    [name, v["n"], v["p50_ms"], v["p99_ms"]]
                    for name, v in (("pipeline", ner["peer"]), ("app", ner["app"]))
                ],
            ),
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


CPU_WORKLOADS = ("one model", "two hot models")


def cpu_point(r: Any) -> tuple[int | None, dict[tuple[str, str], dict]]:
    """The throughput points whose servers' CPU this run measured, at 16 clients (or the most clients under
    it that the run measured): the client count, and (peer, workload) -> the point's summary."""
    found: dict[int, dict[tuple[str, str], dict]] = {}
    for peer, series in r.throughput.items():
        for workload in CPU_WORKLOADS:
            for clients, point in series.get(workload, {}).items():
                if point.get("server_cpu_ms_per_request") and int(clients) <= 16:
                    found.setdefault(int(clients), {})[(peer, workload)] = point
    if not found:
        return None, {}
    clients = max(found)
    return clients, found[clients]


def _cpu(r: Any) -> list[str]:
    """Where the CPU went at 16 clients, by process (scenarios.throughput, bench/cpu.py), if measured."""
    clients, points = cpu_point(r)
    if not points:
        return []
    columns = [(peer, workload) for peer in ("app", "seed") for workload in CPU_WORKLOADS if (peer, workload) in points]
    roles = [role for role in ROLES if any(role in points[c]["server_cpu_ms_per_request"] for c in columns)]
    two = lambda x: "" if x is None else f"{x:.2f}"  # noqa: E731
    rows = [[role, *(two(points[c]["server_cpu_ms_per_request"].get(role)) for c in columns)] for role in roles]
    rows.append(["all", *(two(sum(points[c]["server_cpu_ms_per_request"].values())) for c in columns)])
    rows.append(["CPUs in use (its CPU time over its rounds' time)", *(two(points[c]["server_cpus"]) for c in columns)])
    rows.append(["the load generator (not in *all*)", *(f"{points[c]['cpu_ms_per_request']:.3f}" for c in columns)])
    names = {"app": "app", "seed": "seed-style server"}
    return [
        f"Where the CPU went at {clients} clients: each server's CPU time (user and system, from `/proc`) over "
        "its rounds of the point, by the role of its processes, per request sent (ms; `bench/cpu.py`). "
        f"The machine has {r.machine.get('cpus', '?')} CPUs.",
        "",
        _table(["process", *(f"{names[peer]}, {workload}" for peer, workload in columns)], rows),
        "",
    ]


def _breakdown(r: Any) -> list[str]:
    """Where a hot-path request's time goes, by part (scenarios.hot_breakdown), if this run measured it."""
    b = getattr(r, "breakdown", None)
    if not b:
        return []
    app, seed = b["app"], b["seed"]
    return [
        "Where a hot-path request's time goes: means per request over the same rounds (means add up, percentiles "
        "do not), from the clients' latencies and the servers' own counts of the time they spent on the requests "
        f"(the app's worker replicas counted {app['counted']} of its {app['requests']} requests, in "
        f"{app['batches']} batches; the seed-style server {seed['counted']} of {seed['requests']}):",
        "",
        _table(
            ["part", "app (ms)", "seed-style (ms)"],
            [
                ["end to end, as the client sees it", app["end_to_end_ms"], seed["end_to_end_ms"]],
                ["the model's call: forward pass and encoding the answer", app["model_ms"], seed["model_ms"]],
                [
                    "the worker replica around it: its request handling, the batch queue, the hop to the model's "
                    "thread and back",
                    app["worker_own_ms"],
                    "",
                ],
                [
                    "the rest of the path: the app's HAProxy, the ingress (HTTP, FastAPI, the router), gRPC to the "
                    "worker and back; the seed-style server's HTTP and FastAPI",
                    app["outside_worker_ms"],
                    seed["outside_model_ms"],
                ],
            ],
        ),
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
    b = getattr(r, "breakdown", None)
    if b:
        app, seed = b["app"], b["seed"]
        out.append(
            f"- **The app's time over the seed-style server's, by part** (means per hot-path request: "
            f"{app['end_to_end_ms'] - seed['end_to_end_ms']:.1f} ms in all). The model's call "
            f"{app['model_ms'] - seed['model_ms']:+.1f} ms ({app['model_ms']:.1f} against {seed['model_ms']:.1f}); "
            f"the worker replica around it {app['worker_own_ms']:+.1f} ms; the path between the client and the "
            f"worker replica {app['outside_worker_ms'] - seed['outside_model_ms']:+.1f} ms "
            f"({app['outside_worker_ms']:.1f} against the seed-style server's HTTP, {seed['outside_model_ms']:.1f})."
        )
        floor = {k.split(":")[0]: v.get("mean_ms") for k, v in r.overhead.items()}
        if floor.get("floor hop") is not None:
            out.append(
                f"- **Ray Serve's own floor here** (means): an HTTP request into an ingress replica "
                f"{floor['floor']:.1f} ms, with one hop to a replica of another deployment and back "
                f"{floor['floor hop']:.1f} ms. The app's path outside its worker replicas took "
                f"{app['outside_worker_ms']:.1f} ms, so its own code there (routes and validation, the model-aware "
                f"router) cost {app['outside_worker_ms'] - floor['floor hop']:+.1f} ms over Serve's, and its worker "
                f"replica's handling around the model {app['worker_own_ms']:.1f} ms more."
            )
    clients, points = cpu_point(r)
    app, seed = points.get(("app", "one model")), points.get(("seed", "one model"))
    if app and seed and seed.get("rps"):
        per = app["server_cpu_ms_per_request"]
        total, seed_total = sum(per.values()), sum(seed["server_cpu_ms_per_request"].values())
        by_role = ", ".join(f"{role} {per[role]:.2f}" for role in ROLES if role in per)
        need = 2.2 * seed["rps"] * total / 1000
        out.append(
            f"- **CPU per request at {clients} clients, one model** (from `/proc`): the app "
            f"{total:.2f} ms ({by_role}), using {app['server_cpus']:.2f} CPUs at {app['rps']:.1f} req/s; the "
            f"seed-style server {seed_total:.2f} ms in its one process at {seed['rps']:.1f} req/s. At 2.2x the "
            f"seed-style server's rate, {total:.2f} ms a request would take {need:.2f} CPUs, against the "
            f"{r.machine.get('cpus', '?')} of this machine, shared with the load generator."
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
