"""Audio first (issue #15): the SDP the relay sends asks Opus for in-band FEC and DTX, on every
Opus payload type and nothing else; a real relay's publish answer to a real aiortc offer carries
it. (Chromium's side, that its outbound audio codec then uses them, is in
test_thin_link_browser.py.) A congested subscriber's video is skipped before its audio."""

from __future__ import annotations

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from relay import hooks
from relay.config import MediaConfig
from relay.hooks import AUDIO_BACKLOG_FACTOR
from relay.sdp import OPUS_FMTP, announce, opus_fmtp
from tests.relay.peers import relay_room

CHROMIUM_AUDIO = (
    "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 0\r\n"
    "a=mid:0\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
    "a=rtcp-fb:111 transport-cc\r\n"
    "a=fmtp:111 minptime=10;useinbandfec=0\r\n"
    "a=rtpmap:63 red/48000/2\r\n"
    "a=fmtp:63 111/111\r\n"
    "a=rtpmap:0 PCMU/8000\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 111 96\r\n"
    "a=mid:1\r\n"
    "a=rtpmap:111 VP8/90000\r\n"
    "a=fmtp:111 x-google-start-bitrate=300\r\n"
    "a=rtpmap:96 H264/90000\r\n"
)


def fmtp_lines(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=fmtp:")]


def test_opus_fmtp_merges_into_the_opus_line_only() -> None:
    written = opus_fmtp(CHROMIUM_AUDIO)
    assert fmtp_lines(written) == [
        "a=fmtp:111 minptime=10;useinbandfec=1;usedtx=1",  # merged, the offer's 0 overridden
        "a=fmtp:63 111/111",                                # RED untouched
        "a=fmtp:111 x-google-start-bitrate=300",            # the same number on video: untouched
    ]
    assert "\r\n" in written and "\n" not in written.replace("\r\n", "")
    assert opus_fmtp(written) == written  # idempotent: a renegotiation writes it again


def test_opus_fmtp_adds_a_line_when_there_is_none() -> None:
    aiortc_style = "m=audio 9 UDP/TLS/RTP/SAVPF 96\na=mid:0\na=rtpmap:96 opus/48000/2\na=sendrecv\n"
    written = opus_fmtp(aiortc_style)
    lines = written.splitlines()
    assert lines[lines.index("a=rtpmap:96 opus/48000/2") + 1] == "a=fmtp:96 useinbandfec=1;usedtx=1"
    video_only = "m=video 9 X 96\na=rtpmap:96 VP8/90000\n"
    assert opus_fmtp(video_only) == video_only


def test_announce_writes_both_address_and_opus() -> None:
    config = MediaConfig(announced_address="203.0.113.7", host_addresses=["127.0.0.1"])
    sdp = CHROMIUM_AUDIO + "a=candidate:1 1 udp 2130706431 127.0.0.1 40000 typ host\r\n"
    written = announce(sdp, config)
    assert "203.0.113.7 40000 typ host" in written
    assert "a=fmtp:111 minptime=10;useinbandfec=1;usedtx=1" in written


async def test_relay_publish_answer_asks_for_fec_and_dtx() -> None:
    """A real relay answers a real aiortc publisher's audio offer (which has no fmtp: aiortc's
    Opus has no parameters): the answer's Opus fmtp asks for both, and the publisher takes it."""
    async with relay_room() as room:
        await room.relay.join(room.id, "p1")
        pc = RTCPeerConnection()
        try:
            pc.addTransceiver("audio", direction="sendonly")
            await pc.setLocalDescription(await pc.createOffer())
            assert not fmtp_lines(pc.localDescription.sdp)
            mid = pc.getTransceivers()[0].mid
            assert mid is not None
            answer = await room.relay.publish(room.id, "p1", pc.localDescription.sdp,
                                              {mid: "microphone"})
            opus = fmtp_lines(answer["sdp"])
            expected = ";".join(f"{k}={v}" for k, v in OPUS_FMTP.items())
            assert len(opus) == 1 and opus[0].endswith(f" {expected}"), opus
            await pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], "answer"))
        finally:
            await pc.close()


async def test_backlog_skips_video_before_audio(monkeypatch: pytest.MonkeyPatch) -> None:
    """hooks.backlog_exceeded on real aiortc senders, the queue's depth given: video is
    skipped past the limit, audio only past AUDIO_BACKLOG_FACTOR times it."""
    pc = RTCPeerConnection()
    try:
        audio = pc.addTransceiver("audio", direction="sendonly").sender
        video = pc.addTransceiver("video", direction="sendonly").sender
        limit = 512 * 1024
        depth = {"bytes": 0}
        monkeypatch.setattr(hooks, "backlog_bytes", lambda sender: depth["bytes"])
        for queued, video_skipped, audio_skipped in (
                (limit, False, False), (limit + 1, True, False),
                (AUDIO_BACKLOG_FACTOR * limit, True, False),
                (AUDIO_BACKLOG_FACTOR * limit + 1, True, True)):
            depth["bytes"] = queued
            assert hooks.backlog_exceeded(video, limit) is video_skipped, queued
            assert hooks.backlog_exceeded(audio, limit) is audio_skipped, queued
        assert not hooks.backlog_exceeded(video, 0)  # no limit configured
    finally:
        await pc.close()
