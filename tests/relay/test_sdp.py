"""relay.sdp: reading clients' SDP, the announced address, the codecs of a leg."""

from __future__ import annotations

import pytest

from relay.config import MediaConfig
from relay.errors import BadSdp
from relay.sdp import Codec, announce, leg_codecs, parse_candidate, parse_sdp

SDP = (
    "a=candidate:1 1 udp 2130706431 10.11.0.20 50000 typ host\r\n"
    "a=candidate:2 1 udp 2130706431 192.168.1.5 50001 typ host\r\n"
    "a=candidate:3 1 udp 1694498815 198.51.100.9 50002 typ srflx raddr 10.11.0.20 rport 5\r\n"
)


def test_the_announced_address_replaces_the_configured_host_addresses() -> None:
    config = MediaConfig(host_addresses=["10.11.0.20"], announced_address="203.0.113.20")
    out = announce(SDP, config)
    assert "203.0.113.20 50000 typ host" in out
    assert "192.168.1.5 50001 typ host" in out  # not one of ours: untouched
    assert "198.51.100.9 50002 typ srflx" in out
    assert announce(SDP, MediaConfig()) == SDP


@pytest.mark.parametrize(("sdp", "message"), [
    (None, "must be an SDP string"),
    ("   ", "must be an SDP string"),
    ("v=0\r\n" + "a=x\r\n" * 20_000, "at most"),
    ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n", "no media section"),
])
def test_a_bad_offer_is_refused_naming_what_is_wrong(sdp: object, message: str) -> None:
    with pytest.raises(BadSdp, match=message):
        parse_sdp(sdp, "offer")


def test_a_leg_offers_exactly_the_publishers_codec_and_rtx() -> None:
    h264 = leg_codecs("video", Codec("video/H264", 90000, {
        "packetization-mode": "1", "level-asymmetry-allowed": "1",
        "profile-level-id": "42e01f"}))
    assert [c.mimeType for c in h264] == ["video/H264", "video/rtx"]
    assert h264[0].parameters["profile-level-id"] == "42e01f"
    vp8 = leg_codecs("video", Codec("video/VP8", 90000))
    assert [c.mimeType for c in vp8] == ["video/VP8", "video/rtx"]


def test_a_codec_value_checks_its_input() -> None:
    with pytest.raises(ValueError, match="'VP8'"):
        Codec("VP8", 90000)


def test_a_trickled_candidate_is_parsed_and_the_end_of_candidates_is_none() -> None:
    parsed = parse_candidate({"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ "
                                           "host", "sdpMid": "0", "sdpMLineIndex": 0})
    assert parsed is not None and parsed.ip == "127.0.0.1" and parsed.sdpMid == "0"
    assert parse_candidate({"candidate": ""}) is None
    with pytest.raises(BadSdp, match="not valid"):
        parse_candidate({"candidate": "candidate:nonsense"})
