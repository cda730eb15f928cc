import itertools

import pytest
from pydantic import ValidationError

from deployments.ingress.protocols.native import PredictRequest


@pytest.mark.parametrize("input_data", ["This movie was great!", ["a", "b"], "samples/images/image.jpg"])
def test_predict_request_accepts_string_or_list(input_data):
    assert PredictRequest(model_id="m", input_data=input_data).input_data == input_data


@pytest.mark.parametrize(
    "body, field",
    [
        ({"input_data": "x"}, "model_id"),
        ({"model_id": "", "input_data": "x"}, "model_id"),
        ({"model_id": "m"}, "input_data"),
        ({"model_id": "m", "input_data": ""}, "input_data"),
        ({"model_id": "m", "input_data": []}, "input_data"),
        ({"model_id": "m", "input_data": 42}, "input_data"),
        ({"model_id": 7, "input_data": "x"}, "model_id"),
        ({"model_id": "m", "input_data": ["ok", ""]}, "input_data"),
    ],
)
def test_predict_request_rejects_bad_bodies_naming_the_field(body, field):
    with pytest.raises(ValidationError) as e:
        PredictRequest.model_validate(body)
    assert any(err["loc"][0] == field for err in e.value.errors())


def test_a_body_of_at_most_4_kib_is_parsed_on_the_event_loop_and_a_larger_one_in_a_thread():
    import asyncio
    import threading

    from deployments.ingress.bodies import INLINE_PARSE_BYTES, parse_bounded

    threads = []

    def parse(body: bytes) -> int:
        threads.append(threading.current_thread())
        return len(body)

    async def both() -> tuple[int, int]:
        small = await parse_bounded(parse, b"x" * INLINE_PARSE_BYTES)
        return small, await parse_bounded(parse, b"x" * (INLINE_PARSE_BYTES + 1))

    assert INLINE_PARSE_BYTES == 4096
    assert asyncio.run(both()) == (4096, 4097)
    assert threads[0] is threading.main_thread()
    assert threads[1] is not threading.main_thread()


def test_large_bodies_are_parsed_one_at_a_time_and_small_ones_meanwhile():
    """A parse holds the GIL and what it builds: more at once are no faster, and hold more memory."""
    import asyncio
    import threading

    from deployments.ingress.bodies import INLINE_PARSE_BYTES, MAX_PARSES_AT_ONCE, parse_bounded

    running, most, lock, release = [0], [0], threading.Lock(), threading.Event()

    def parse(body: bytes) -> int:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(10)  # each large parse waits until the small ones below have run
        with lock:
            running[0] -= 1
        return len(body)

    async def at_once() -> list[int]:
        large = [asyncio.create_task(parse_bounded(parse, b"x" * (INLINE_PARSE_BYTES + 1))) for _ in range(4)]
        await asyncio.sleep(0.05)  # the first large parse is running, the others wait their turn
        small = await parse_bounded(len, b"abc")  # on the event loop, not behind the large ones
        release.set()
        return [small, *await asyncio.gather(*large)]

    assert asyncio.run(at_once()) == [3, *[INLINE_PARSE_BYTES + 1] * 4]
    assert MAX_PARSES_AT_ONCE == 1 and most[0] == 1


class CountedReads:
    """A body source for the tokenizer that counts its reads: the bytes ``check_json_budget`` hands over,
    read as ijson reads them (a body given as bytes, in reads of ijson's default size)."""

    def __init__(self, source) -> None:
        import io

        self.source = io.BytesIO(source) if isinstance(source, bytes) else source
        self.reads: list[int] = []

    def read(self, size: int = -1) -> bytes:
        chunk = self.source.read(size)
        if size:
            self.reads.append(len(chunk))
        return chunk


def test_a_long_string_reaches_the_tokenizer_in_a_few_reads_that_double_so_it_costs_its_length_once(monkeypatch):
    """The tokenizer reads a token cut by the end of a read again from its start: a string of 8 MB in reads
    of one size costs the square of its length (an 8 MB body of escapes held the ingress for 5 s). It gets
    the body in reads that double, and the body as it was."""
    import ijson

    from deployments.ingress import bodies

    seen: list[CountedReads] = []
    real = ijson.basic_parse

    def counting(source, *args, **kwargs):
        seen.append(CountedReads(source))
        return real(seen[-1], *args, **kwargs)

    monkeypatch.setattr(bodies.ijson, "basic_parse", counting)
    body = b'{"model_id":"sentiment","input_data":"' + b"\\n" * 4_000_000 + b'"}'
    bodies.check_json_budget(body, 10, "a test")
    (reads,) = [[n for n in c.reads if n] for c in seen]
    assert sum(reads) == len(body) and len(reads) <= 8  # 123 reads of 64 KiB before
    assert all(later == 2 * earlier for earlier, later in itertools.pairwise(reads[:-1]))  # the last: the rest
    assert reads[0] == bodies.FIRST_READ_BYTES  # a body of many small values is refused within its first read
    with pytest.raises(bodies.InvalidInput):
        bodies.check_json_budget(b"[" + b"[]," * 100_000 + b"[]]", 10, "a test")
    assert sum(seen[-1].reads) <= bodies.FIRST_READ_BYTES


@pytest.mark.parametrize(
    "body, reason",
    [
        (b'\xff\xfe{"model_id": "m", "input_data": "x"}', "lexical error: invalid char in json text."),
        (b'{"model_id": "m", "input_data": "\xff secret"}', "lexical error: invalid bytes in UTF8 string."),
        (b'{"model_id": "m", "input_data": "x"', "parse error: premature EOF"),
    ],
)
def test_a_body_that_is_not_json_is_refused_with_the_reason_alone_not_the_bytes_around_it(body, reason):
    """yajl's message quotes the body around the fault, as Python bytes; the client's answer has its first
    line only."""
    from deployments.ingress import bodies

    with pytest.raises(bodies.MalformedRequest) as e:
        bodies.check_json_budget(body, 10, "a test")
    assert e.value.message == f"the request body is not valid JSON: {reason}"


@pytest.mark.parametrize(
    "body, named",
    [(b'{"input_data": NaN}', True), (b'{"input_data": Infinity}', True), (b'{"input_data": "x"', False)],
)
def test_a_body_that_is_not_json_is_refused_naming_nan_only_where_the_body_has_it(body, named):
    from deployments.ingress import bodies

    with pytest.raises(bodies.MalformedRequest) as e:
        bodies.check_json_budget(body, 10, "a test")
    assert e.value.message.startswith("the request body is not valid JSON")
    assert ("NaN and Infinity are not JSON" in e.value.message) is named
