"""The node's side of relay:hello and relay:drain answers: what fits is read, what does not is
refused with a code (the node then keeps its rooms, or closes them at the end of a stop)."""

from __future__ import annotations

import pytest

from relay.remote import DrainResult, HelloResult, RemoteRelayError, parse_answer


def test_an_answer_that_fits_is_read() -> None:
    hello = parse_answer("relay:hello", {"ok": True, "result": {"adopted": ["a"],
                                                               "close": ["b"]}}, HelloResult)
    assert hello.adopted == ["a"] and hello.close == ["b"]
    drained = parse_answer("relay:drain", {"ok": True, "result": {
        "moved": 2, "connected": 5, "waited_s": 1.25}}, DrainResult)
    assert (drained.moved, drained.connected, drained.waited_s) == (2, 5, 1.25)


@pytest.mark.parametrize(("answer", "code"), [
    ({"error": {"code": "unknown_node", "message": "not a node"}}, "unknown_node"),
    ({"ok": True, "result": {"adopted": ["a"]}}, "invalid_answer"),
    ({"ok": True, "result": {"adopted": "a", "close": []}}, "invalid_answer"),
    ({"ok": False}, "invalid_answer"),
    (None, "invalid_answer"),
    ("yes", "invalid_answer"),
])
def test_an_answer_that_does_not_fit_is_refused_with_a_code(answer: object,
                                                              code: str) -> None:
    with pytest.raises(RemoteRelayError) as refused:
        parse_answer("relay:hello", answer, HelloResult)
    assert refused.value.code == code
    assert "relay:hello" in refused.value.message or code == "unknown_node"
