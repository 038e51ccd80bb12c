import tracemalloc

import orjson
import pytest

from overnight.batches.validation import MAX_REPORTED_ERRORS, ValidationLimits, validate_input
from overnight.storage.memory import MemoryStorage
from tests.factories import request_line

LIMITS = ValidationLimits(max_requests=50_000, max_bytes=200 * 1024 * 1024)


async def _validate(data: bytes, limits: ValidationLimits = LIMITS, endpoint: str = "/v1/chat/completions"):
    storage = MemoryStorage()
    await storage.put_bytes("in", data)
    return await validate_input(storage, "in", endpoint=endpoint, limits=limits)


def _lines(objs) -> bytes:
    return b"".join(orjson.dumps(o) + b"\n" for o in objs)


async def test_valid_file_reports_total_and_model():
    r = await _validate(_lines(request_line(i) for i in range(10)))
    assert r.ok and r.total == 10 and r.model == "mock-model"


async def test_last_line_without_newline_counts():
    r = await _validate(_lines([request_line(0)]) + orjson.dumps(request_line(1)))
    assert r.ok and r.total == 2


async def test_duplicate_custom_id_names_both_lines():
    objs = [request_line(i) for i in range(5)] + [request_line(2)]
    r = await _validate(_lines(objs))
    assert [(e["code"], e["line"]) for e in r.errors] == [("duplicate_custom_id", 6)]
    assert "line 3" in r.errors[0]["message"]


async def test_file_too_large_is_one_error():
    r = await _validate(_lines([request_line(0)]), ValidationLimits(max_requests=10, max_bytes=10))
    assert r.errors[0]["code"] == "file_too_large" and r.errors[0]["line"] is None


async def test_error_list_is_capped():
    r = await _validate(b"{\n" * (MAX_REPORTED_ERRORS + 50))
    assert len(r.errors) == MAX_REPORTED_ERRORS


async def test_embeddings_endpoint_checks_url():
    r = await _validate(_lines([request_line(0)]), endpoint="/v1/embeddings")
    assert r.errors[0]["code"] == "invalid_url"


@pytest.mark.parametrize("n", [20_000])
async def test_uniqueness_bookkeeping_is_compact(n):
    data = _lines(request_line(i) for i in range(n))
    storage = MemoryStorage()
    await storage.put_bytes("in", data)
    tracemalloc.start()
    try:
        r = await validate_input(storage, "in", endpoint="/v1/chat/completions", limits=LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.ok and r.total == n
    # 8-byte hashes plus a sort copy and read chunks; far below a set of strings.
    assert peak < 4 * 1024 * 1024 + 40 * n, peak


async def test_bom_and_trailing_blank_lines_are_accepted():
    data = b"\xef\xbb\xbf" + _lines(request_line(i) for i in range(3)) + b"\n  \r\n\n"
    r = await _validate(data)
    assert r.ok, r.errors
    assert r.total == 3


async def test_blank_line_before_more_requests_is_still_an_error():
    data = _lines([request_line(0)]) + b"\n" + _lines([request_line(1)])
    r = await _validate(data)
    assert [(e["code"], e["line"]) for e in r.errors] == [("empty_line", 2)]


async def test_u2028_inside_a_custom_id_does_not_split_the_line():
    objs = [request_line(0), {**request_line(1), "custom_id": "a\u2028b\u2029c\x85d"}]
    r = await _validate(_lines(objs))
    assert r.ok and r.total == 2


async def test_duplicates_are_reported_with_other_errors_in_one_pass():
    objs = [request_line(0), request_line(1), request_line(0)]
    data = _lines(objs[:2]) + b"{not json\n" + _lines(objs[2:])
    r = await _validate(data)
    assert [(e["code"], e["line"]) for e in r.errors] == [("invalid_json_line", 3), ("duplicate_custom_id", 4)]


async def test_json_error_names_the_line_and_column_not_an_offset():
    data = _lines([request_line(0), request_line(1)]) + b'{"custom_id": oops}\n'
    r = await _validate(data)
    (e,) = r.errors
    assert e["line"] == 3 and e["param"] is None
    assert e["message"].startswith("Line 3 is not valid JSON at column 15")
    assert "(char " not in e["message"]
