"""The benchmark's load generators (bench/loadgen.py, bench/loadgen.lua): the HTTP/1.1 answers rawhttp
parses, the plans both generators read, what they report, and both run against a small local server that
records what reached it. wrk's tests skip only where wrk is not installed; rawhttp's always run."""

import json
import math
import socket
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest

from bench import loadgen
from bench.loadgen import Plan, ProtocolError, Request, Response, ResponseParser
from bench.scenarios import Run, hot_side_by_side, rounds_of

# -- parsing answers ---------------------------------------------------------------------------------------


def feed_in_pieces(raw: bytes, cut: list[int]) -> list[Response]:
    """Feed `raw` cut at the given offsets; every response that came out."""
    parser, out, start = ResponseParser(), [], 0
    for end in [*cut, len(raw)]:
        r = parser.feed(raw[start:end])
        if r is not None:
            out.append(r)
        start = end
    return out


def every_split(raw: bytes):
    yield []
    yield list(range(1, len(raw)))  # byte by byte
    for k in range(1, len(raw)):
        yield [k]


OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 22\r\n\r\n{"model_id": "alpha"} '


def test_a_content_length_answer_comes_out_once_whatever_the_pieces():
    for cut in every_split(OK):
        assert feed_in_pieces(OK, cut) == [Response(200, b'{"model_id": "alpha"} ', True)], cut


def test_a_chunked_answer_with_extensions_and_trailers_whatever_the_pieces():
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'7;name=value\r\n{"a": 1\r\n'
        b'A\r\n, "b": 22}\r\n'
        b"0\r\nX-Trailer: yes\r\n\r\n"
    )
    for cut in every_split(raw):
        assert feed_in_pieces(raw, cut) == [Response(200, b'{"a": 1, "b": 22}', True)], cut
    two_trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nA: 1\r\nB: 2\r\n\r\n"
    for cut in every_split(two_trailers):
        assert feed_in_pieces(two_trailers, cut) == [Response(200, b"abc", True)], cut
    plain_end = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    for cut in every_split(plain_end):
        assert feed_in_pieces(plain_end, cut) == [Response(200, b"abc", True)], cut


def test_chunked_framing_wins_over_a_content_length():
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    assert ResponseParser().feed(raw) == Response(200, b"ok", True)


def test_one_parser_reads_the_answers_of_a_kept_alive_connection_one_after_the_other():
    parser = ResponseParser()
    second = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
    assert parser.feed(OK) == Response(200, b'{"model_id": "alpha"} ', True)
    assert parser.feed(second[:10]) is None
    assert parser.feed(second[10:]) == Response(500, b"", True)
    assert parser.feed(OK) is not None


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 2", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2", True),
    ],
)
def test_keep_alive_follows_the_version_and_the_connection_header(head, keep_alive):
    assert ResponseParser().feed(head + b"\r\n\r\nok") == Response(200, b"ok", keep_alive)


def test_an_answer_without_length_runs_to_the_end_of_the_connection():
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nsome") is None
    assert parser.feed(b" more") is None
    assert parser.eof() == Response(200, b"some more", False)


def test_no_body_after_204_and_interim_answers_are_skipped():
    assert ResponseParser().feed(b"HTTP/1.1 204 No Content\r\n\r\n") == Response(204, b"", True)
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
    for cut in every_split(raw):
        assert feed_in_pieces(raw, cut) == [Response(200, b"x", True)], cut


def test_a_connection_closed_between_answers_is_no_answer_and_mid_answer_is_an_error():
    assert ResponseParser().eof() is None
    for partial in (OK[:20], OK[:-3]):
        parser = ResponseParser()
        assert parser.feed(partial) is None
        with pytest.raises(ProtocolError):
            parser.eof()
    chunked = ResponseParser()
    chunked.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
    with pytest.raises(ProtocolError):
        chunked.eof()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nabEXTRA",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nEXTRA",
    ],
)
def test_what_is_not_one_http_answer_is_a_protocol_error(raw):
    with pytest.raises(ProtocolError):
        ResponseParser().feed(raw)


def test_a_head_that_never_ends_is_a_protocol_error():
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProtocolError):
        parser.feed(b"X-Long: " + b"a" * (loadgen.MAX_HEAD + 10))


# -- plans, checks, wrk's output ------------------------------------------------------------------------------


def test_spread_deals_requests_round_robin_in_order_and_never_leaves_a_client_empty():
    reqs = [Request("GET", f"/{i}") for i in range(7)]
    clients = loadgen.spread(reqs, 3)
    assert [[r.path for r in c] for c in clients] == [["/0", "/3", "/6"], ["/1", "/4"], ["/2", "/5"]]
    assert len(loadgen.spread(reqs[:2], 16)) == 2
    with pytest.raises(ValueError):
        Plan("http://127.0.0.1:1", [[]])


def test_a_plan_round_trips_through_its_file_with_the_url_prefix_on_every_path(tmp_path):
    body = json.dumps({"model_id": "m-1", "input_data": "tab\there, line\nthere"}).encode()
    predict = Request("POST", "/predict", body, ("model_id", "m-1"))
    plan = Plan("http://127.0.0.1:9/app/", [[predict], [Request("GET", "/x")]])
    path = loadgen.write_plan(plan, tmp_path / "plan.tsv")
    assert path.read_text().count("\n") == 2
    assert loadgen.read_plan(path) == {
        0: [Request("POST", "/app/predict", body, ("model_id", "m-1"))],
        1: [Request("GET", "/app/x")],
    }
    assert loadgen.read_plan(path, {1}) == {1: [Request("GET", "/app/x")]}
    assert plan.base == "http://127.0.0.1:9"


@pytest.mark.parametrize(
    "request_",
    [
        Request("POST", "/p", b'{"a":\t1}'),
        Request("POST", "/p", b"{}\n"),
        Request("get", "/p"),
        Request("GET", "p"),
        Request("POST", "/p", b"{}", ("model_id", 'a"b')),
    ],
)
def test_a_plan_refuses_what_its_file_cannot_carry(request_, tmp_path):
    with pytest.raises(ValueError):
        loadgen.write_plan(Plan("http://127.0.0.1:9", [[request_]]), tmp_path / "plan.tsv")


def test_the_expected_value_matches_compact_and_spaced_json_and_nothing_longer():
    check = loadgen.expect_pattern(("model_id", "sentiment"))
    assert check.search(b'{"model_id":"sentiment","predictions":[]}')
    assert check.search(b'{"predictions": [], "model_id" :  "sentiment"}')
    assert not check.search(b'{"model_id": "sentiment2"}')
    assert not check.search(b'{"model": "sentiment"}')
    assert loadgen.expect_pattern(None) is None


def test_requests_are_encoded_as_http_1_1_with_their_length():
    raw = loadgen.encode(Request("POST", "/predict", b'{"a": 1}'), "h:1")
    head = b"POST /predict HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n"
    assert raw == head + b'{"a": 1}'
    assert loadgen.encode(Request("GET", "/healthz"), "h:1") == b"GET /healthz HTTP/1.1\r\nHost: h:1\r\n\r\n"


WRK_OUTPUT = """Running 15m test @ http://127.0.0.1:1
  2 threads and 2 connections
@client 1 sent=3 ok=2 status=1 mismatch=0 lost=0 first=10.5 last=11 cpu=0.002 codes=500:1 err=35303020 lat=1000,3000.5
@client 0 sent=2 ok=1 status=0 mismatch=1 lost=0 first=10 last=10.75 cpu=0.001 codes= err=3230302078 lat=2000.0
  Thread Stats   Avg      Stdev     Max   +/- Stdev
@wrk requests=5 connect=0 read=0 write=0 status=1 timeout=0
"""


def test_wrk_output_gives_each_clients_counts_latencies_and_cpu():
    r = loadgen.parse_wrk_output(WRK_OUTPUT, clients=2)
    assert sorted(r.latencies) == [0.001, 0.002, 0.0030005]
    assert (r.sent, r.ok, r.answered_or_lost) == (5, 3, 5)
    assert r.errors == {"status": 1, "mismatch": 1, "lost": 0, "connect": 0}
    assert r.codes == {"500": 1} and r.first_error == "200 x"  # the first client's first error
    assert (r.first, r.last, r.elapsed) == (10.0, 11.0, 1.0)
    assert r.cpu_s == pytest.approx(0.003)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (WRK_OUTPUT.replace("requests=5", "requests=6"), "wrk counted 6 answers"),
        (WRK_OUTPUT.replace("@client 0", "@client 1"), "reported twice"),
        ("\n".join(line for line in WRK_OUTPUT.splitlines() if "@client 0" not in line), r"clients \[0\]"),
        ("\n".join(line for line in WRK_OUTPUT.splitlines() if "@wrk" not in line), "no summary"),
        (WRK_OUTPUT.replace("ok=2", "ok=3"), "3 answered, 2 latencies"),
    ],
)
def test_wrk_output_that_does_not_add_up_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        loadgen.parse_wrk_output(text, clients=2)


def test_the_grpc_answer_check_reads_model_name_from_real_messages():
    from tritonclient.grpc import service_pb2 as pb

    answer = pb.ModelInferResponse(model_name="sentiment", model_version="1", id="r-7")
    answer.outputs.add(name="output", datatype="BYTES", shape=[1, 2])
    answer.raw_output_contents.append(b"\x00" * 300)
    assert loadgen.proto_string_field(answer.SerializeToString(), 1) == "sentiment"
    assert loadgen.proto_string_field(pb.ModelInferResponse(id="x").SerializeToString(), 1) is None
    with pytest.raises(ValueError):
        loadgen.proto_string_field(answer.SerializeToString()[:5], 1)


def test_rounds_add_up_counts_and_take_the_median_rate():
    def part(n: int, elapsed: float) -> Run:
        return Run(latencies=[0.01] * n, elapsed=elapsed, sent=n + 1, errors=1, generator="rawhttp", cpu_s=0.001 * n)

    run = rounds_of([part(10, 1.0), part(10, 0.5), part(10, 0.25)])
    s = run.summary()
    assert (s["n"], s["sent"], s["errors"], s["rounds"]) == (30, 33, 3, 3)
    assert s["rps"] == 20.0  # the median of 10, 20 and 40
    assert s["cpu_ms_per_request"] == pytest.approx(30 / 33)
    assert math.isnan(Run(latencies=[0.1], sent=1).summary()["cpu_ms_per_request"])  # no generator: in-process


def test_an_in_process_peer_takes_its_rounds_in_turn_with_the_others():
    """The in-process floor is measured between the servers' rounds, not before them: each round of the hot
    path takes every peer once, a different one first each time, and each peer gets its share of requests."""
    order: list[tuple[str, int]] = []

    def peer(name: str):
        def round_(n: int) -> Run:
            order.append((name, n))
            return Run(latencies=[0.001] * n, elapsed=0.001 * n, sent=n)

        return round_

    runs = hot_side_by_side({}, 12, rounds=3, warmed=True, local={"a": peer("a"), "b": peer("b"), "c": peer("c")})
    assert order == [("a", 4), ("b", 4), ("c", 4), ("b", 4), ("c", 4), ("a", 4), ("c", 4), ("a", 4), ("b", 4)]
    assert {name: (r.summary()["n"], r.summary()["rounds"]) for name, r in runs.items()} == {
        "a": (12, 3),
        "b": (12, 3),
        "c": (12, 3),
    }


def test_a_result_whose_requests_do_not_add_up_is_refused():
    r = loadgen.Result("rawhttp", latencies=[0.1], sent=2)
    with pytest.raises(RuntimeError, match="2 sent, 1 accounted for"):
        Run.of(r)


# -- both generators against a local server --------------------------------------------------------------------


class RecordingServer:
    """An HTTP/1.1 server on a free local port that records each request (connection, path, body) and
    answers by the last part of its path: ok, chunked, close (then closes), http10 (no length, closes),
    split (the answer in small writes), slow (after 50 ms), status500, wrong (another model), drop (closes
    without an answer)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[tuple[int, str, dict]] = []
        self.lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                no = self.connections
            threading.Thread(target=self._serve, args=(conn, no), daemon=True).start()

    def _serve(self, conn: socket.socket, no: int) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = conn.makefile("rb")
        with conn, f:
            while True:
                line = f.readline()
                if not line:
                    return
                _, path, _ = line.decode().split(" ")
                headers = {}
                while (h := f.readline()) not in (b"\r\n", b""):
                    k, _, v = h.decode().partition(":")
                    headers[k.strip().lower()] = v.strip()
                raw = f.read(int(headers.get("content-length", 0)))
                body = json.loads(raw) if raw else {}
                with self.lock:
                    self.seen.append((no, path, body))
                if not self._answer(conn, path.rsplit("/", 1)[-1], body):
                    return

    @staticmethod
    def _answer(conn: socket.socket, how: str, body: dict) -> bool:
        """Answer; False when the connection is to close."""
        model = body.get("model_id", "")
        payload = json.dumps({"model_id": "other" if how == "wrong" else model, "ok": True}).encode()
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        if how == "drop":
            return False
        if how == "slow":
            time.sleep(0.05)
        if how == "status500":
            conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}")
        elif how == "chunked":
            half = len(payload) // 2
            chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in (payload[:half], payload[half:]))
            conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\nX-T: 1\r\n\r\n")
        elif how == "close":
            conn.sendall(head + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
            return False
        elif how == "http10":
            conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + payload)
            return False
        elif how == "split":
            raw = head + b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
            for k in range(0, len(raw), 7):
                conn.sendall(raw[k : k + 7])
        else:
            conn.sendall(head + b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        return True

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread in accept(), which close() alone does not
            self.sock.close()


@pytest.fixture
def server():
    s = RecordingServer()
    yield s
    s.close()


GENERATORS = [
    "rawhttp",
    pytest.param("wrk", marks=pytest.mark.skipif(loadgen.wrk_path() is None, reason="wrk is not installed")),
]


def plan_of(url: str, hows: list[str], clients: int) -> Plan:
    """Request i: POST /<how> carrying its client and its place among that client's requests."""
    per_client: dict[int, list[Request]] = defaultdict(list)
    for i, how in enumerate(hows):
        k = i % clients
        body = json.dumps({"model_id": f"m{i % 3}", "input_data": f"{k}-{len(per_client[k])}"}).encode()
        per_client[k].append(Request("POST", f"/{how}", body, ("model_id", f"m{i % 3}")))
    return Plan(url, [per_client[k] for k in range(clients)])


def assert_in_plan_order(server: RecordingServer, plan: Plan) -> None:
    """Every request reached the server once, and each client's in its plan's order."""
    got: dict[str, list[int]] = defaultdict(list)
    for _, _, body in server.seen:
        client, seq = body["input_data"].split("-")
        got[client].append(int(seq))
    assert {k: got[str(k)] for k in range(len(plan.clients))} == {
        k: list(range(len(c))) for k, c in enumerate(plan.clients)
    }


@pytest.mark.parametrize("generator", GENERATORS)
def test_every_framing_is_answered_and_each_client_sends_in_plan_order(generator, server):
    hows = ["ok", "chunked", "close", "http10", "split"] * 8
    plan = plan_of(server.url, hows, clients=3)
    r = loadgen.run_http(plan, generator)
    assert (r.sent, r.ok, r.failed) == (40, 40, 0)
    assert len(server.seen) == 40
    assert_in_plan_order(server, plan)
    assert all(lat > 0 for lat in r.latencies) and r.elapsed > 0
    assert 0 < r.cpu_s <= r.cpu_total_s and math.isfinite(r.cpu_total_s)
    # kept-alive connections are reused: one per client, and another after each answer that closed its own;
    # rawhttp opens it for the client's next request (none after its last one); wrk opens it at once, and
    # after an answer that ran to the end of its connection, once more (its read of the end fails)
    closing = [i for i, how in enumerate(hows) if how in ("close", "http10")]
    last = {len(hows) - 1 - k for k in range(3)}
    if generator == "rawhttp":
        assert server.connections == 3 + len(set(closing) - last)
    else:
        assert server.connections >= 3 + len(closing)


@pytest.mark.parametrize("generator", GENERATORS)
def test_errors_are_counted_by_kind_and_every_request_is_accounted_for(generator, server):
    # the last request of each client is good: wrk sends one uncounted request after a lost last answer
    hows = ["status500", "ok", "wrong", "drop", "ok", "status500", "ok", "ok", "ok", "ok"]
    plan = plan_of(server.url, hows, clients=2)
    r = loadgen.run_http(plan, generator)
    assert r.errors == {"status": 2, "mismatch": 1, "lost": 1, "connect": 0}
    assert r.codes == {"500": 2}
    assert r.first_error.startswith(("500: {}", "200 without the expected value: ", "no answer: "))
    assert (r.sent, r.ok, r.answered_or_lost) == (10, 6, 10)
    assert len(r.latencies) == 6
    assert len(server.seen) == 10
    assert_in_plan_order(server, plan)
    summary = Run.of(r).summary()
    assert (summary["n"], summary["sent"], summary["errors"]) == (6, 10, 4)


@pytest.mark.parametrize("generator", GENERATORS)
def test_a_path_prefix_and_get_requests(generator, server):
    plan = Plan(server.url + "/bench", loadgen.spread([Request("GET", "/ok")] * 5, 2))
    r = loadgen.run_http(plan, generator)
    assert (r.sent, r.ok) == (5, 5)
    assert [path for _, path, _ in server.seen] == ["/bench/ok"] * 5


@pytest.mark.parametrize("generator", GENERATORS)
def test_a_timed_run_cycles_through_each_clients_requests(generator, server):
    plan = plan_of(server.url, ["ok", "chunked"] * 2, clients=2)
    plan.duration_s = 0.5
    r = loadgen.run_http(plan, generator)
    assert r.failed == 0 and r.sent == r.ok == len(server.seen) > 4
    for client in ("0", "1"):  # each client cycles: 0, 1, 0, 1, ...
        seqs = [int(b["input_data"].split("-")[1]) for _, _, b in server.seen if b["input_data"].startswith(client)]
        assert seqs == [k % 2 for k in range(len(seqs))]


@pytest.mark.parametrize("generator", GENERATORS)
def test_a_timed_run_ends_in_the_middle_of_a_plan_when_its_time_is_up(generator, server):
    plan = plan_of(server.url, ["slow"] * 400, clients=2)  # 20 s of answers at the least
    plan.duration_s = 0.3
    r = loadgen.run_http(plan, generator)
    assert r.failed == 0 and 2 <= r.sent == r.ok == len(server.seen) < 400


def test_rawhttp_deals_clients_over_processes_and_skips_requests_it_cannot_connect_for(server):
    plan = plan_of(server.url, ["ok"] * 12, clients=4)
    r = loadgen.run_rawhttp(plan, processes=2)
    assert (r.sent, r.ok) == (12, 12)
    assert_in_plan_order(server, plan)
    port = server.port
    server.close()
    r = loadgen.run_rawhttp(Plan(f"http://127.0.0.1:{port}", [[Request("GET", "/ok")] * 3]))
    assert (r.sent, r.ok, r.errors["connect"]) == (0, 0, 3)


@pytest.mark.skipif(loadgen.wrk_path() is None, reason="wrk is not installed")
def test_wrk_refuses_a_server_that_is_not_there(server):
    port = server.port
    server.close()
    with pytest.raises(OSError):
        loadgen.run_wrk(Plan(f"http://127.0.0.1:{port}", [[Request("GET", "/ok")]]))


def test_the_generator_is_chosen_and_named(monkeypatch):
    monkeypatch.setenv("BENCH_GENERATOR", "rawhttp")
    assert loadgen.use(None) == "rawhttp" == loadgen.chosen()
    assert "raw sockets" in loadgen.describe("rawhttp")
    with pytest.raises(ValueError):
        loadgen.use("httpx")
    monkeypatch.setattr(loadgen, "wrk_path", lambda: None)
    with pytest.raises(RuntimeError, match="apt-get install wrk"):
        loadgen.use("wrk")
    monkeypatch.delenv("BENCH_GENERATOR")
    assert loadgen.use(None) == "rawhttp"  # wrk absent


@pytest.mark.skipif(loadgen.wrk_path() is None, reason="wrk is not installed")
def test_wrk_is_named_with_its_version_and_the_script():
    assert loadgen.describe("wrk").startswith("wrk ") and "bench/loadgen.lua" in loadgen.describe("wrk")
    assert Path(loadgen.LUA_SCRIPT).exists()


# -- the gRPC generator against a local server -------------------------------------------------------------------


@pytest.fixture
def grpc_server():
    """inference.GRPCInferenceService/ModelInfer on a free local port: it records each request's id and
    answers with its model, except model "wrong" (another model's name) and "missing" (NOT_FOUND)."""
    from concurrent import futures

    import grpc
    from tritonclient.grpc import service_pb2 as pb

    seen: list[str] = []

    def infer(raw: bytes, context) -> bytes:
        request = pb.ModelInferRequest.FromString(raw)
        seen.append(request.id)
        if request.model_name == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "Unknown model 'missing'")
        name = "other" if request.model_name == "wrong" else request.model_name
        return pb.ModelInferResponse(model_name=name, id=request.id).SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", seen
    server.stop(grace=None)


def test_the_grpc_generator_counts_answers_by_kind_and_keeps_each_clients_order(grpc_server):
    from tritonclient.grpc import service_pb2 as pb

    target, seen = grpc_server
    models = ["m", "m", "wrong", "m", "missing", "m", "m", "m"]
    clients: list[list[loadgen.GrpcRequest]] = [[], []]
    for i, model in enumerate(models):
        k = i % 2
        message = pb.ModelInferRequest(model_name=model, id=f"{k}-{len(clients[k])}").SerializeToString()
        clients[k].append(loadgen.GrpcRequest("/inference.GRPCInferenceService/ModelInfer", message, model))
    r = loadgen.run_grpc(target, clients)
    assert (r.sent, r.ok, r.answered_or_lost) == (8, 6, 8)
    assert r.errors == {"status": 1, "mismatch": 1, "lost": 0, "connect": 0}
    assert r.codes == {"NOT_FOUND": 1}
    assert "Unknown model 'missing'" in r.first_error or "'other', not 'wrong'" in r.first_error
    assert sorted(seen) == sorted(f"{k}-{j}" for k in (0, 1) for j in range(4))
    for k in ("0", "1"):
        assert [s for s in seen if s.startswith(k)] == [f"{k}-{j}" for j in range(4)]
    assert 0 < r.cpu_s <= r.cpu_total_s and r.elapsed > 0
