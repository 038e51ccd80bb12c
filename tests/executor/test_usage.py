"""Engine usage is untrusted: only whole non-negative counts in range are summed,
and no usage value can make a checkpoint unencodable."""

from __future__ import annotations

import math

import orjson
import pytest

from overnight.executor.checkpoint import Checkpoint
from overnight.executor.usage import MAX_TOKENS, Usage


@pytest.mark.parametrize("bad", [1e30, 10**30, 2**64, -1, -1e3, 1.5, math.inf, math.nan, "12", True, [1], {"a": 1}])
def test_a_value_that_is_not_a_token_count_is_ignored_and_counted(bad) -> None:
    u = Usage()
    u.add({"prompt_tokens": bad, "completion_tokens": 3, "completion_tokens_details": {"reasoning_tokens": bad}})
    assert (u.input_tokens, u.output_tokens, u.reasoning_tokens) == (0, 3, 0)
    assert u.ignored == 2
    d = u.to_dict()
    assert d["ignored_values"] == 2 and d["total_tokens"] == 3
    Checkpoint(total=1, done=Checkpoint.empty(1).done, usage=d).encode()  # always encodable
    assert Usage.from_dict(d).ignored == 2


def test_valid_counts_are_summed_under_either_naming() -> None:
    u = Usage()
    u.add({"prompt_tokens": 5, "completion_tokens": 7.0, "prompt_tokens_details": {"cached_tokens": 2}})
    u.add({"input_tokens": 1, "output_tokens": MAX_TOKENS, "output_tokens_details": {"reasoning_tokens": 4}})
    u.add("not a dict")
    assert u.to_dict() == {
        "input_tokens": 6, "output_tokens": 7 + MAX_TOKENS, "total_tokens": 13 + MAX_TOKENS,
        "input_tokens_details": {"cached_tokens": 2}, "output_tokens_details": {"reasoning_tokens": 4},
    }
    assert orjson.loads(orjson.dumps(u.to_dict()))["output_tokens"] == 7 + MAX_TOKENS
