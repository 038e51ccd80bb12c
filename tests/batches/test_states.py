from overnight.batches.states import TERMINAL, TIMESTAMP_FIELD, TRANSITIONS, BatchStatus, can_transition

S = BatchStatus


def test_openai_lifecycle_paths_are_allowed():
    assert can_transition("validating", "in_progress")
    assert can_transition("in_progress", "finalizing")
    assert can_transition("finalizing", "completed")
    assert can_transition("validating", "failed")
    assert can_transition("in_progress", "expired")
    assert can_transition("in_progress", "cancelling") and can_transition("validating", "cancelling")
    assert can_transition("cancelling", "cancelled")


def test_terminal_states_go_nowhere():
    assert TERMINAL == {S.COMPLETED, S.FAILED, S.EXPIRED, S.CANCELLED}
    for s in TERMINAL:
        assert not any(can_transition(s, d) for d in S)


def test_forbidden_jumps():
    assert not can_transition("validating", "completed")
    assert not can_transition("cancelling", "completed")
    assert not can_transition("finalizing", "cancelling")


def test_every_non_initial_status_has_a_timestamp():
    assert set(TIMESTAMP_FIELD) == set(S) - {S.VALIDATING}
    assert set(TRANSITIONS) == set(S)
