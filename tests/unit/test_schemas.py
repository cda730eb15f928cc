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
