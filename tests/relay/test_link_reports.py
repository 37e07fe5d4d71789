"""relay.link.LinkReports: the link's loss and delivered rate from receiver reports'
cumulative counts, over intervals of its own, on a clock the test drives."""

from __future__ import annotations

import pytest

from relay.link import INTERVAL_S, MIN_PACKETS, REPORT_GAP_S, LinkReports

SIZE = 1000.0


def test_reports_a_nack_apart_wait_for_the_interval() -> None:
    """A browser puts a receiver report in every RTCP packet, one with each NACK: each one's
    own fraction covers a few packets. Here the interval is at least ``INTERVAL_S``."""
    reports = LinkReports()
    assert reports.receipt("v", 0.0, 1000, 0, size=SIZE) is None  # a mark
    for n in range(1, 10):  # every 40 ms, one of five lost
        assert reports.receipt("v", n * 0.04, 1000 + 5 * n, n, size=SIZE) is None
    interval = reports.receipt("v", INTERVAL_S, 1050, 10, size=SIZE)
    assert interval is not None and interval.expected == 50
    assert interval.lost == pytest.approx(0.2)
    assert interval.bps == pytest.approx(40 * SIZE * 8 / INTERVAL_S)


def test_late_packets_take_the_loss_back_not_below_none() -> None:
    reports = LinkReports()
    reports.receipt("v", 0.0, 100, 10, size=SIZE)
    interval = reports.receipt("v", 1.0, 200, 4, size=SIZE)  # six came late
    assert interval is not None and interval.lost == 0.0 and interval.expected == 100


def test_the_link_s_loss_is_weighted_by_packets_and_needs_enough_of_them() -> None:
    reports = LinkReports()
    reports.receipt("thin", 0.0, 0, 0, size=SIZE)
    reports.receipt("audio", 0.0, 0, 0, size=100.0)
    reports.receipt("thin", 1.0, 10, 1, size=SIZE)  # 10 %, of ten packets
    assert reports.loss(1.0) is None  # ten packets say nothing
    reports.receipt("audio", 1.0, 190, 0, size=100.0)
    assert reports.loss(1.0) == pytest.approx(1 / 200)
    assert MIN_PACKETS <= 200
    assert reports.delivered_bps(1.0) == pytest.approx(9 * SIZE * 8 + 190 * 100.0 * 8)
    # Chromium reports an audio leg every 5 s: its interval still counts 5 s later.
    assert reports.loss(5.9) == pytest.approx(1 / 200)
    assert reports.loss(7.5) is None


def test_an_outage_is_no_measure_of_the_link_whichever_way_it_came() -> None:
    """No report at all for ``REPORT_GAP_S`` (both ways out), or reports that say nothing
    arrived (the downlink out): the interval that spans it would count every packet sent into
    the outage lost. It is not measured; the next one is."""
    silent = LinkReports()
    silent.receipt("v", 0.0, 0, 0, size=SIZE)
    silent.receipt("v", 1.0, 100, 0, size=SIZE)
    silent.receipt("a", 1.0, 50, 0, size=SIZE)
    assert silent.receipt("v", 1.0 + REPORT_GAP_S + 3, 700, 400, size=SIZE) is None
    assert silent.outages == 1
    after = silent.receipt("v", 1.0 + REPORT_GAP_S + 4, 800, 401, size=SIZE)
    assert after is not None and after.lost == pytest.approx(0.01)
    # The first report after it may still tell of the time before: the next one, with the
    # outage's packets counted lost, is not measured either.
    late = LinkReports()
    late.receipt("v", 0.0, 0, 0, size=SIZE)
    late.receipt("v", 1.0, 100, 0, size=SIZE)
    late.receipt("a", 1.0, 50, 0, size=SIZE)
    at = 1.0 + REPORT_GAP_S + 3
    assert late.receipt("v", at, 100, 0, size=SIZE) is None  # nothing new yet
    assert late.receipt("a", at, 50, 0, size=SIZE) is None
    assert late.receipt("v", at + 1, 700, 450, size=SIZE) is None  # the outage's holes
    assert late.receipt("a", at + 1, 300, 200, size=SIZE) is None
    assert late.loss(at + 1) is None
    after = late.receipt("v", at + 2, 800, 451, size=SIZE)
    assert after is not None and after.lost == pytest.approx(0.01)

    idle = LinkReports()
    idle.receipt("v", 0.0, 0, 0, size=SIZE)
    idle.receipt("v", 1.0, 100, 0, size=SIZE)
    for n in range(2, 7):  # the reports come, nothing new in them
        assert idle.receipt("v", float(n), 100, 0, size=SIZE) is None
    assert idle.receipt("v", 7.0, 700, 500, size=SIZE) is None  # the first after it
    assert idle.outages == 1
    after = idle.receipt("v", 8.0, 800, 500, size=SIZE)
    assert after is not None and after.lost == 0.0


def test_the_publisher_s_own_loss_is_taken_off() -> None:
    reports = LinkReports()
    reports.receipt("v", 0.0, 0, 0, size=SIZE, upstream=("p", 0, 0))
    interval = reports.receipt("v", 1.0, 100, 25, size=SIZE, upstream=("p", 90, 100))
    assert interval is not None and interval.lost == pytest.approx(0.15)
    # Another publication on the leg: nothing to compare with.
    other = reports.receipt("v", 2.0, 200, 35, size=SIZE, upstream=("q", 10, 50))
    assert other is not None and other.lost == pytest.approx(0.10)
