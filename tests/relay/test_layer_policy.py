"""relay.bandwidth.LayerPolicy: which temporal layers a subscriber gets, as a table of receiver
reports on a clock the test drives, its settings (relay.layer_*), and the video pause held
until layer 0."""

from __future__ import annotations

from typing import Any

import pytest

from relay.bandwidth import (
    BACKLOG_HIGH_BYTES,
    CLIMB_S,
    CONFIRM_APART_S,
    CONFIRM_WITHIN_S,
    MAX_QUIET_S,
    QUEUE_DELAY_S,
    QUIET_S,
    STEP_DOWN_EVERY_S,
    THIN,
    BandwidthPolicy,
    LayerPolicy,
    LayerSettings,
)
from relay.participant import rate_news

CALM: dict[str, Any] = {"loss": 0.0, "rtt_s": 0.6}
"""A quiet report on a satellite link (600 ms round trip, no loss)."""


def run(policy: LayerPolicy, reports: list[tuple[float, dict[str, Any]]]) -> list[int]:
    return [policy.update(at, **report) for at, report in reports]


def down_to_0(policy: LayerPolicy) -> float:
    """Loss that lasts: confirmed at 1.5 s (layer 1), layer 0 at 2.5 s; the time of the last
    report."""
    assert run(policy, [(0.0, {"loss": 0.2}), (1.5, {"loss": 0.2}), (2.5, {"loss": 0.2})]) == \
        [2, 1, 0]
    return 2.5


AT_ONCE = [1, 1, 0, 0, 0, 0, 0, 0]
CONFIRMED = [2, 2, 2, 1, 1, 0, 0, 0]
"""Loss, a rise or a low estimate, from the top: the first step waits for a report 1.5 s after
the first one (the 4th, at 2.5 s), then one step a second."""


@pytest.mark.parametrize(("name", "report", "reason", "expected"), [
    ("12 % loss", {"loss": 0.12, "rtt_s": 0.6}, "loss", CONFIRMED),
    ("exactly 5 % loss", {"loss": 0.05, "rtt_s": 0.6}, "loss", CONFIRMED),
    ("a send backlog", {"backlog_bytes": BACKLOG_HIGH_BYTES, "rtt_s": 0.6}, "backlog", AT_ONCE),
    ("video queued in the relay's pacer", {"queue_delay_s": QUEUE_DELAY_S, "rtt_s": 0.6},
     "backlog", AT_ONCE),
    ("a queue on the path", {"rtt_s": 0.95}, "rtt", CONFIRMED),
    ("a low estimate with 3 % loss", {"loss": 0.03, "rtt_s": 0.6, "estimate_bps": 100_000,
                                      "send_bps": 400_000}, "estimate", CONFIRMED),
    ("a low estimate with a rising round trip",
     {"rtt_s": 0.75, "estimate_bps": 100_000, "send_bps": 400_000}, "estimate", CONFIRMED),
])
def test_congestion_steps_down_one_layer_a_second_to_layer_0_and_no_further(
        name: str, report: dict[str, Any], reason: str, expected: list[int]) -> None:
    policy = LayerPolicy()
    assert policy.update(0.0, **CALM) == 2
    at = 1.0
    layers = []
    for _ in range(8):  # several report blocks a second (one per leg), for 4 s
        layers.append(policy.update(at, **report))
        at += STEP_DOWN_EVERY_S / 2
    assert layers == expected, name
    assert policy.reason == reason


@pytest.mark.parametrize(("name", "report"), [
    ("one burst of loss (the machine's own UDP drops)", {"loss": 0.3, "rtt_s": 0.6}),
    ("one slow round trip (the relay's own delay)", {"rtt_s": 1.2}),
    ("aiortc's low estimate with one burst of 3 % loss",
     {"loss": 0.03, "rtt_s": 0.6, "estimate_bps": 100_000, "send_bps": 900_000}),
])
def test_one_moment_of_loss_or_delay_seen_in_every_legs_report_keeps_the_top_layer(
        name: str, report: dict[str, Any]) -> None:
    """A good link's subscriber was stepped down for one burst: every leg's next report (they
    come 0.5-1.5 s apart per leg) tells of it, all within 1.5 s of the first."""
    policy = LayerPolicy()
    policy.update(0.0, **CALM)
    legs = [10.0 + t for t in (0.0, 0.3, 0.7, 1.1, CONFIRM_APART_S - 0.01)]
    assert run(policy, [(t, report) for t in legs]) == [2] * len(legs), name
    assert set(run(policy, [(12.0 + t / 2, CALM) for t in range(20)])) == {2}, name


def test_a_second_congested_report_more_than_3_s_later_starts_over() -> None:
    policy = LayerPolicy()
    policy.update(0.0, **CALM)
    lossy: dict[str, Any] = {"loss": 0.1, "rtt_s": 0.6}
    assert policy.update(10.0, **lossy) == 2
    assert policy.update(10.0 + CONFIRM_WITHIN_S + 0.1, **lossy) == 2  # forgotten: a first again
    assert policy.update(10.0 + CONFIRM_WITHIN_S + 0.1 + CONFIRM_APART_S, **lossy) == 1
    # Below the top, loss steps down at once (one step a second), as before.
    assert policy.update(10.0 + CONFIRM_WITHIN_S + 1.1 + CONFIRM_APART_S, **lossy) == 0
    assert policy.reason == "loss"


def test_a_rise_confirmed_by_a_loss_report_steps_down() -> None:
    """Two congested reports, whatever their witness (a queue shows as a rise, then loss)."""
    policy = LayerPolicy()
    policy.update(0.0, rtt_s=0.6)
    assert policy.update(1.0, rtt_s=0.95) == 2
    assert policy.update(1.0 + CONFIRM_APART_S, loss=0.08, rtt_s=0.7) == 1


@pytest.mark.parametrize(("name", "report"), [
    ("random loss under 5 %", {"loss": 0.04, "rtt_s": 0.6}),
    ("a low estimate alone (aiortc's, climbing from nothing)",
     {"rtt_s": 0.6, "estimate_bps": 20_000, "send_bps": 900_000}),
    ("a small backlog", {"backlog_bytes": BACKLOG_HIGH_BYTES - 1, "rtt_s": 0.6}),
    ("a short pacer queue", {"queue_delay_s": QUEUE_DELAY_S - 0.01, "rtt_s": 0.6}),
    ("a round trip slightly up", {"rtt_s": 0.85}),
    ("a low estimate with 1 % loss", {"loss": 0.01, "rtt_s": 0.6, "estimate_bps": 20_000,
                                      "send_bps": 900_000}),
    ("nothing known", {}),
])
def test_what_is_no_congestion_keeps_every_layer(name: str, report: dict[str, Any]) -> None:
    policy = LayerPolicy()
    policy.update(0.0, **CALM)
    assert set(run(policy, [(t / 2, report) for t in range(1, 40)])) == {2}, name


def test_the_round_trip_rise_is_measured_from_the_lowest_of_the_last_30_s() -> None:
    policy = LayerPolicy()
    run(policy, [(t, {"rtt_s": 0.3}) for t in range(5)])
    assert policy.update(5.0, rtt_s=0.65) == 2  # 350 ms of queue over 300: a first report
    assert policy.update(6.5, rtt_s=0.66) == 1
    # A longer route for good: after 30 s of it, 650 ms is the new floor.
    policy = LayerPolicy()
    policy.update(0.0, rtt_s=0.3)
    run(policy, [(t, {"rtt_s": 0.59}) for t in range(1, 40)])
    assert policy.update(40.0, rtt_s=0.65) == 2


def test_probing_up_one_layer_after_a_quiet_period_then_climbing() -> None:
    """The first probe after a quiet period; once it held CLIMB_S, the next after as long."""
    policy = LayerPolicy()
    last = down_to_0(policy)
    quiet = [(last + t / 2, CALM) for t in range(1, 40)]
    layers = run(policy, quiet)
    up_at = [quiet[i][0] for i in range(1, len(layers)) if layers[i] > layers[i - 1]]
    assert [round(t - last - 0.5, 1) for t in up_at] == [QUIET_S, QUIET_S + CLIMB_S]
    assert policy.layer == 2 and policy.reason == "probe"


def test_from_the_thin_rendition_a_good_link_has_every_layer_within_10_s() -> None:
    """The issue's return: the weak one back at full rate within 10 s of its link's return."""
    policy = LayerPolicy(bottom=THIN)
    at = 0.0
    for _ in range(8):  # a queue in the relay's pacer: down a step a second, to thin
        at += 1.0
        policy.update(at, queue_delay_s=1.0, rtt_s=0.6)
    assert policy.layer == THIN
    returned = at
    while policy.layer < 2 and at < returned + 30:
        at += 0.5
        policy.update(at, rtt_s=0.05)
    print(f"every layer {at - returned:.1f} s after the link's return")
    assert at - returned <= 10.0


def test_a_climb_stops_at_the_first_probe_that_fails() -> None:
    policy = LayerPolicy(bottom=THIN)
    for t in range(1, 9):
        policy.update(float(t), queue_delay_s=1.0, rtt_s=0.6)
    at = 8.0
    while policy.layer < 1:
        at += 0.5
        policy.update(at, rtt_s=0.6)
    # Layer 1 is too much: its queue comes back.
    at += 0.5
    policy.update(at, queue_delay_s=1.0, rtt_s=0.6)
    assert policy.layer == 0 and policy.quiet_s == 2 * QUIET_S
    downed = at
    while policy.layer == 0 and at < downed + 30:
        at += 0.5
        policy.update(at, rtt_s=0.6)
    assert at - downed >= 2 * QUIET_S  # backed off, not climbing


def test_a_probe_that_fails_doubles_the_quiet_period_and_one_that_holds_resets_it() -> None:
    policy = LayerPolicy()
    at = down_to_0(policy) + 1.0
    quiet = QUIET_S
    for _ in range(5):  # every probe to layer 1 brings loss back at once
        while policy.update(at, **CALM) == 0:
            at += 0.5
        at += 0.5
        assert policy.update(at, loss=0.1) == 0  # a second after the last step down
        quiet = min(quiet * 2, MAX_QUIET_S)
        assert policy.quiet_s == quiet
        at += 0.5
    assert policy.quiet_s == MAX_QUIET_S
    while policy.update(at, **CALM) == 0:
        at += 0.5
    probed = at
    while at < probed + 2 * MAX_QUIET_S + 1:  # the probe holds
        at += 0.5
        policy.update(at, **CALM)
    assert policy.quiet_s == QUIET_S and policy.layer == 2


def test_a_probe_to_the_top_that_fails_is_confirmed_and_doubles_the_quiet_period() -> None:
    """Back at the top, loss needs its second report again; the probe counts as failed from
    the first one."""
    policy = LayerPolicy()
    at = down_to_0(policy)
    while policy.layer < 2:
        at += 0.5
        policy.update(at, **CALM)
    probed = at
    assert policy.update(probed + 0.5, loss=0.1) == 2
    assert policy.update(probed + 0.5 + CONFIRM_APART_S, loss=0.1) == 1
    assert policy.quiet_s == 2 * QUIET_S


def test_a_top_layer_of_1_is_never_exceeded() -> None:
    policy = LayerPolicy(top=1)
    assert policy.layer == 1
    assert set(run(policy, [(t, CALM) for t in range(30)])) == {1}


def test_video_queued_in_the_pacer_takes_layer_0_to_the_thin_rendition() -> None:
    """A queue in the relay's own pacer is a lack of rate, as a send backlog is: below layer 0
    it takes the thin rendition (loss alone would stop at layer 0)."""
    policy = LayerPolicy(bottom=THIN)
    layers = [policy.update(float(t), rtt_s=0.6, queue_delay_s=0.8) for t in range(5)]
    assert layers == [1, 0, THIN, THIN, THIN]
    assert policy.reason == "backlog"


def test_the_settings_move_every_threshold_and_the_quiet_periods() -> None:
    settings = LayerSettings(quiet_s=2.0, max_quiet_s=4.0, loss=0.02, rtt_rise_s=0.1,
                             backlog_bytes=10_000, queue_delay_s=0.2)
    cases: list[tuple[dict[str, Any], str]] = [({"backlog_bytes": 10_000}, "backlog"),
                                               ({"queue_delay_s": 0.2}, "backlog"),
                                               ({"loss": 0.02}, "loss"),
                                               ({"rtt_s": 0.75}, "rtt")]
    for report, reason in cases:
        quiet: dict[str, Any] = {"loss": 0.0, "rtt_s": 0.6, "backlog_bytes": 0,
                                 "estimate_bps": None, "send_bps": None}
        policy = LayerPolicy(settings)
        assert policy.congestion(0.0, **quiet) is None
        assert policy.congestion(1.0, **{**quiet, **report}) == reason, report
        # Under each threshold of the defaults: no congestion with them.
        assert LayerPolicy().congestion(0.0, **{**quiet, **report}) is None, report
    # The quiet period (2 s) and its doubling up to 4 s.
    policy = LayerPolicy(settings)
    at = 0.0
    for _ in range(4):
        policy.update(at, loss=0.5)
        at += 1.0
    assert policy.layer == 0
    ups = []
    for _ in range(4):  # each probe fails at once
        start = at
        while policy.update(at, **CALM) == 0:
            at += 0.5
        ups.append(at - start)
        at += 0.5
        policy.update(at, loss=0.5)
        at += 1.0
    assert ups == [2.0, 4.0, 4.0, 4.0] and policy.quiet_s == 4.0


def test_the_video_pause_window_starts_afresh_once_layer_0_is_reached() -> None:
    bandwidth = BandwidthPolicy(floor_bps=150_000, window_s=2.0)
    bandwidth.loss_reported(0.2, 0.0)
    assert not bandwidth.estimate_reported(40_000, 0.0)  # low since 0
    bandwidth.estimate_held(40_000)  # the layers stepped down meanwhile
    bandwidth.loss_reported(0.2, 2.5)
    assert not bandwidth.estimate_reported(40_000, 2.5)  # the window starts here
    assert not bandwidth.estimate_reported(40_000, 4.0)
    assert bandwidth.estimate_reported(40_000, 4.6)


@pytest.mark.parametrize(("quality", "told", "now", "news"), [
    ("reduced", None, 7.5, True),  # the rate became known
    ("full", None, 30.0, True),
    ("reduced", 7.5, None, False),  # unknown again (paused meanwhile): nothing to say
    ("reduced", 16.0, 7.5, True),  # the publisher's encoder moved to fewer layer-0 frames
    ("reduced", 7.5, 9.0, False),  # under 2 fps
    ("reduced", 15.0, 18.0, False),  # under a quarter
    ("reduced", 15.0, 19.0, True),
    ("full", 30.0, 20.0, False),  # the full rate is the publisher's business
])
def test_a_frame_rate_is_news_when_it_becomes_known_or_a_reduced_one_moves(
        quality: str, told: float | None, now: float | None, news: bool) -> None:
    assert rate_news(quality, told, now) is news


def test_thin_over_base_a_lack_of_rate_below_layer_1_takes_the_rendition_and_returns_to_1(
) -> None:
    """The relay's own policy (``thin_over_base``): layer 0 (a quarter of the camera's frame
    rate) is skipped both ways for a lack of rate; loss alone still stops at layer 0."""
    policy = LayerPolicy(bottom=THIN, thin_over_base=True)
    assert run(policy, [(1.0, {"queue_delay_s": 1.0, "rtt_s": 0.6}),
                        (2.0, {"queue_delay_s": 1.0, "rtt_s": 0.6})]) == [1, THIN]
    at = 2.0
    while policy.layer == THIN and at < 20:
        at += 0.5
        policy.update(at, **CALM)
    assert policy.layer == 1 and policy.reason == "probe"
    lossy = LayerPolicy(bottom=THIN, thin_over_base=True)
    assert down_to_0(lossy) == 2.5 and lossy.layer == 0
    assert lossy.update(4.0, loss=0.2) == 0  # loss alone: no further


def test_no_probe_to_a_layer_that_needs_more_than_the_link_carried_when_full() -> None:
    """A step down for a lack of rate notes what the link delivered then; a probe to a layer
    that needs more is spared until the ceiling is 30 s old or the round trip falls to
    another link's."""
    needs = {1: 700_000.0, 2: 1_100_000.0}
    policy = LayerPolicy(bottom=THIN, thin_over_base=True)
    full = {"queue_delay_s": 1.0, "rtt_s": 0.6, "delivered_bps": 450_000.0}
    run(policy, [(1.0, full), (2.0, {**full, "delivered_bps": 180_000.0})])
    assert policy.layer == THIN and policy.ceiling is not None
    assert policy.ceiling[1] == 450_000.0  # the spell's highest reading, not its last
    at = 2.0
    while at < 31.0:
        at += 0.5
        policy.update(at, rtt_s=0.6, delivered_bps=300_000.0, need_bps=needs.get)
        assert policy.layer == THIN, at
    assert policy.probes_spared >= 5
    while policy.layer == THIN and at < 40.0:  # the ceiling is stale: a real probe
        at += 0.5
        policy.update(at, rtt_s=0.6, delivered_bps=300_000.0, need_bps=needs.get)
    assert policy.layer == 1 and 32.0 <= at <= 37.0
    # A layer that fits under the ceiling is probed as before.
    fits = LayerPolicy(bottom=THIN, thin_over_base=True)
    run(fits, [(1.0, full), (2.0, full)])
    at = 2.0
    while fits.layer == THIN and at < 10.0:
        at += 0.5
        fits.update(at, rtt_s=0.6, need_bps=lambda layer: 400_000.0)
    assert fits.layer == 1 and fits.probes_spared == 0
    # Another link (the round trip fell to a tenth): the ceiling is forgotten at once.
    moved = LayerPolicy(bottom=THIN, thin_over_base=True)
    run(moved, [(1.0, full), (2.0, full)])
    at = 2.0
    while moved.layer == THIN and at < 10.0:
        at += 0.5
        moved.update(at, rtt_s=0.05, need_bps=needs.get)
    assert moved.layer == 1 and moved.ceiling is None
