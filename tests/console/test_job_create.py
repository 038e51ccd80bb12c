"""``POST /api/v1/jobs`` bodies: what ``JobCreate`` refuses, with the field named,
before anything is provisioned. A value the batch would refuse at submit is
refused here, since finding it there would fail the job after a resource was paid
for."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from overnight.console.jobs import JobCreate
from overnight.errors import InvalidRequestError

BASE = {"input_dataset": "file-in", "endpoint": "/v1/chat/completions", "model_template_name": "mock-tiny"}


@pytest.mark.parametrize(("extra", "param", "says"), [
    ({"completion_window": "soon"}, "completion_window", "Invalid completion_window 'soon'"),
    ({"completion_window": 24}, "completion_window", "Invalid completion_window 24"),
    ({"completion_window": "0h"}, "completion_window", "between 1s and"),
    ({"completion_window": "400d"}, "completion_window", "between 1s and"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16 pairs"),
    ({"metadata": {"k" * 65: "v"}}, "metadata", "longer than 64"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k", "longer than 512"),
    ({"metadata": {"k": 1}}, "metadata.k", "must be a string"),
    ({"metadata": ["k"]}, "metadata", "must be an object"),
    ({"provision_resource_deadline": 1e20}, "provision_resource_deadline", "Unix time in the future"),
    ({"provision_resource_deadline": float("inf")}, "provision_resource_deadline", "Unix time in the future"),
    ({"provision_resource_deadline": 1}, "provision_resource_deadline", "Unix time in the future"),
    ({"provision_resource_deadline": True}, "provision_resource_deadline", "Unix time in the future"),
    ({"provision_resource_deadline": "tomorrow"}, "provision_resource_deadline", "Unix time in the future"),
])
def test_a_bad_field_is_refused_naming_it(extra: dict[str, Any], param: str, says: str) -> None:
    with pytest.raises(InvalidRequestError, match=says) as err:
        JobCreate({**BASE, **extra})
    assert err.value.param == param


def test_nan_from_the_wire_is_not_a_deadline() -> None:
    # JSON's NaN (which Python's parser takes) compares false with everything: it
    # passed a "not in the past" check, and was stored as null.
    body = json.loads(json.dumps(BASE)[:-1] + ', "provision_resource_deadline": NaN}')
    with pytest.raises(InvalidRequestError) as err:
        JobCreate(body)
    assert err.value.param == "provision_resource_deadline"


def test_what_is_taken() -> None:
    assert JobCreate(BASE).completion_window == "24h"  # OpenAI's only window, the default
    soon = time.time() + 3600
    req = JobCreate({**BASE, "completion_window": "1h", "metadata": {f"k{i}": "v" * 512 for i in range(16)},
                     "provision_resource_deadline": soon})
    assert req.completion_window == "1h" and len(req.metadata) == 16 and req.deadline == soon
    assert JobCreate({**BASE, "metadata": None}).metadata == {}
