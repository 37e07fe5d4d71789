"""relay.bandwidth: when video toward a subscriber pauses for bandwidth, with a clock the test
drives."""

from __future__ import annotations

from relay.bandwidth import LOSS_WINDOW_S, BandwidthPolicy, SendRate


def test_a_low_estimate_without_loss_never_pauses() -> None:
    policy = BandwidthPolicy(floor_bps=150_000, window_s=0.2)
    assert not any(policy.estimate_reported(20_000, t / 10) for t in range(50))
    assert policy.estimate_bps == 20_000


def test_a_low_estimate_with_loss_pauses_once_it_lasts_the_window() -> None:
    policy = BandwidthPolicy(floor_bps=150_000, window_s=0.2)
    policy.loss_reported(0.12, 0.0)
    assert not policy.estimate_reported(40_000, 0.0)  # the window starts
    assert not policy.estimate_reported(40_000, 0.1)
    assert policy.estimate_reported(40_000, 0.25)
    assert policy.paused
    assert not policy.estimate_reported(40_000, 0.5)  # already paused: decided once
    policy.resumed()
    assert not policy.paused


def test_an_estimate_back_over_the_floor_restarts_the_window() -> None:
    policy = BandwidthPolicy(floor_bps=150_000, window_s=0.2)
    policy.loss_reported(0.12, 0.0)
    policy.estimate_reported(40_000, 0.0)
    policy.estimate_reported(400_000, 0.1)
    assert not policy.estimate_reported(40_000, 0.25)
    assert policy.estimate_reported(40_000, 0.5)


def test_old_loss_reports_stop_counting() -> None:
    policy = BandwidthPolicy(floor_bps=150_000, window_s=0.2)
    policy.loss_reported(0.12, 0.0)
    policy.loss_reported(0.01, 1.0)
    assert policy.recent_loss(1.0) == 0.12
    assert policy.recent_loss(LOSS_WINDOW_S + 0.5) == 0.01
    assert not policy.estimate_reported(40_000, LOSS_WINDOW_S + 0.5)
    assert not policy.estimate_reported(40_000, LOSS_WINDOW_S + 1.0)


def test_a_floor_of_zero_never_pauses() -> None:
    policy = BandwidthPolicy(floor_bps=0, window_s=0.0)
    policy.loss_reported(0.5, 0.0)
    assert not any(policy.estimate_reported(1, t) for t in range(5))


def test_the_send_rate_is_measured_per_group_of_legs_half_a_second_apart() -> None:
    rate = SendRate()
    assert rate.sample([2, 1], 0, 0.0) is None
    assert rate.total_bps is None
    assert rate.sample([1, 2], 10_000, 0.2) is None  # too soon: no rate yet
    assert rate.sample([1, 2], 12_500, 1.0) == 100_000
    assert rate.sample([3], 0, 1.0) is None
    assert rate.sample([1, 2], 99_999, 1.1) == 100_000  # too soon: the last rate
    assert rate.total_bps == 100_000


def test_on_the_thin_rendition_the_floor_is_what_is_being_sent() -> None:
    """Thin sends ~130 kbps (video and audio): an estimate that follows it, under the 150 kbps
    floor, is no reason to pause; one that falls short of it, with loss, is."""
    policy = BandwidthPolicy(floor_bps=150_000, window_s=0.2)
    policy.loss_reported(0.12, 0.0)
    thin_floor = int(130_000 * 0.8)
    assert not any(policy.estimate_reported(127_000, t / 10, floor_bps=thin_floor)
                   for t in range(10))
    assert not policy.estimate_reported(60_000, 1.0, floor_bps=thin_floor)
    assert policy.estimate_reported(60_000, 1.3, floor_bps=thin_floor)
    # The configured floor stays the upper bound: a higher one asked for is not taken.
    other = BandwidthPolicy(floor_bps=150_000, window_s=0.2)
    other.loss_reported(0.12, 0.0)
    assert not other.estimate_reported(160_000, 0.0, floor_bps=400_000)
    assert not other.estimate_reported(160_000, 0.5, floor_bps=400_000)
