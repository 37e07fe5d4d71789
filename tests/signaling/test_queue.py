"""ConsultQueue ordering: priority first (stat, asap, urgent, routine), then waiting time."""

from __future__ import annotations

import random

from signaling.models import ConsultRequest
from signaling.queue import ConsultQueue


def req(rid: str, priority: str, at: float, specialty: str = "cardiology") -> ConsultRequest:
    return ConsultRequest(rid, "d1", "ref1", specialty, priority, "r", None,  # type: ignore[arg-type]
                          "waiting", at)


def test_requests_are_ordered_by_priority_then_waiting_time() -> None:
    queue = ConsultQueue()
    items = [req("a", "routine", 1), req("b", "stat", 5), req("c", "urgent", 2),
             req("d", "stat", 3), req("e", "asap", 4), req("f", "routine", 0)]
    random.Random(7).shuffle(items)
    for item in items:
        queue.add(item)
    assert [r.id for r in queue.lane("cardiology")] == ["d", "b", "e", "c", "f", "a"]
    assert [queue.position(x) for x in "dbecfa"] == [1, 2, 3, 4, 5, 6]
    assert [r.id for r in queue.behind(queue.get("e"))] == ["c", "f", "a"]  # type: ignore[arg-type]


def test_removing_closes_the_gap_and_lanes_are_per_specialty() -> None:
    queue = ConsultQueue()
    for item in (req("a", "stat", 1), req("b", "stat", 2), req("x", "stat", 0, "neurology")):
        queue.add(item)
    assert queue.position("b") == 2 and queue.position("x") == 1
    assert queue.remove("a") is not None
    assert queue.position("b") == 1 and queue.position("a") is None
    assert queue.remove("a") is None
    assert queue.counts_by_priority() == {"stat": 2, "asap": 0, "urgent": 0, "routine": 0}
    visible = queue.visible_to(frozenset({"neurology"}), everything=False,
                               escalated=True)
    assert [r.id for r in visible] == ["x"]
    queue.get("b").escalated_at = 5.0  # type: ignore[union-attr]
    visible = queue.visible_to(frozenset({"neurology"}), everything=False,
                               escalated=True)
    assert [r.id for r in visible] == ["x", "b"]
    assert [r.id for r in queue.visible_to(frozenset(), everything=True,
                                           escalated=False)] == ["x", "b"]
