"""relay/fec.py on its own: RED as RFC 2198 writes it, the ULPFEC parity rebuilding any one
packet of its group as RFC 5109 section 8 recovers it, the groups' sizes, the policy; and the
subscribe offer and answer that carry RED and ULPFEC (relay/sdp.py). Chromium rebuilding the
relay's FEC: test_fec_browser.py."""

from __future__ import annotations

import random
import struct

from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from codec.rtp import rtp_payload_offset
from relay.fec import (
    FEC_OFF_S,
    GROUP_MAX,
    GROUP_MIN,
    RED_PT,
    ULPFEC_PT,
    FecPolicy,
    UlpfecEncoder,
    fec_payload,
    red_wrap,
)
from relay.sdp import fec_accepted, offer_fec


def extensions() -> HeaderExtensionsMap:
    mapping = HeaderExtensionsMap()
    mapping.configure(type("P", (), {"headerExtensions": [
        RTCRtpHeaderExtensionParameters(id=1, uri="urn:ietf:params:rtp-hdrext:sdes:mid"),
        RTCRtpHeaderExtensionParameters(
            id=3, uri="http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time")]})())
    return mapping


def media(seq: int, size: int, marker: bool, rng: random.Random) -> bytes:
    packet = RtpPacket(payload_type=97, marker=int(marker), sequence_number=seq,
                       timestamp=90000 + 3000 * (seq // 3), ssrc=0x1234ABCD,
                       payload=rng.randbytes(size))
    packet.extensions.mid = "1"
    packet.extensions.abs_send_time = rng.randrange(1 << 24)
    return bytes(packet.serialize(extensions()))


def recover(fec: bytes, received: dict[int, bytes], ssrc: bytes) -> tuple[int, bytes]:
    """RFC 5109 8.2: the one missing packet of the group, from the FEC payload and the rest."""
    bits0, bits1, base, timestamps, lengths, protection, mask = struct.unpack("!BBHIHHH",
                                                                              fec[:14])
    assert bits0 & 0xC0 == 0  # E = 0, L = 0
    body = int.from_bytes(fec[14:14 + protection], "big")
    protected = [(base + i) % 65536 for i in range(16) if mask & (1 << (15 - i))]
    missing = [seq for seq in protected if seq not in received]
    assert len(missing) == 1
    for seq in protected:
        if seq in received:
            data = received[seq]
            bits0 ^= data[0]
            bits1 ^= data[1]
            timestamps ^= int.from_bytes(data[4:8], "big")
            lengths ^= len(data) - 12
            body ^= int.from_bytes(data[12:], "big") << (8 * (protection - (len(data) - 12)))
    payload = body.to_bytes(protection, "big")[:lengths]
    header = struct.pack("!BBHI", 0x80 | (bits0 & 0x3F), bits1, missing[0], timestamps) + ssrc
    return missing[0], header + payload


def test_red_wraps_the_payload_behind_one_primary_block_header_and_keeps_the_header() -> None:
    data = media(7, 100, True, random.Random(1))
    red = red_wrap(data, RED_PT)
    length = rtp_payload_offset(data)
    assert length == 12 + 4 + 8  # the one-byte extension block: mid and abs-send-time
    assert red[1] == 0x80 | RED_PT  # marker kept
    assert red[0] == data[0] and red[2:length] == data[2:length]
    assert red[length] == 97 and red[length + 1:] == data[length:]


def test_the_parity_rebuilds_any_one_packet_of_its_group_byte_for_byte() -> None:
    rng = random.Random(7)
    for trial in range(50):
        first = rng.randrange(65536)
        packets = [((first + i) % 65536, media((first + i) % 65536, rng.randrange(20, 1100),
                                                i == 4, rng)) for i in range(5)]
        fec = fec_payload(packets)
        lost = rng.randrange(len(packets))
        received = {seq: data for i, (seq, data) in enumerate(packets) if i != lost}
        seq, rebuilt = recover(fec, received, packets[0][1][8:12])
        assert (seq, rebuilt) == packets[lost], trial


def test_a_group_closes_at_a_frame_end_from_four_packets_or_at_eight() -> None:
    rng = random.Random(3)
    encoder = UlpfecEncoder()
    sizes = []
    seq = 65530  # across the wrap
    for _ in range(40):
        count = rng.choice([1, 1, 2, 3, 12])
        for i in range(count):
            out = encoder.add(seq % 65536, media(seq % 65536, 200, i == count - 1, rng),
                              i == count - 1)
            seq += 1
            if out is not None:
                mask = struct.unpack("!H", out[12:14])[0]
                sizes.append(bin(mask).count("1"))
    assert encoder.groups == len(sizes) > 10
    assert all(GROUP_MIN <= n <= GROUP_MAX for n in sizes), sizes
    assert encoder.protected == sum(sizes)
    # A parity as long as the longest of 4-8 packets of one size: an eighth to a quarter more.
    overhead = encoder.fec_bytes / encoder.media_bytes
    assert 0.12 < overhead < 0.27, overhead


def test_a_sequence_number_outside_the_mask_starts_a_new_group() -> None:
    rng = random.Random(4)
    encoder = UlpfecEncoder()
    assert encoder.add(100, media(100, 50, False, rng), False) is None
    assert encoder.add(130, media(130, 50, False, rng), False) is None  # the pacer rewound
    for seq in (131, 132):
        assert encoder.add(seq, media(seq, 50, False, rng), False) is None
    out = encoder.add(133, media(133, 50, True, rng), True)
    assert out is not None and struct.unpack("!H", out[2:4])[0] == 130


def test_the_policy_turns_fec_on_for_a_long_lossy_link_and_off_after_it_is_not() -> None:
    policy = FecPolicy("auto")
    assert not policy.update(0.0, loss=0.02, rtt_s=0.05)  # short: NACK is enough
    assert not policy.update(1.0, loss=0.001, rtt_s=0.6)  # long, not lossy
    assert not policy.update(2.0, loss=None, rtt_s=0.6)
    assert policy.update(3.0, loss=0.01, rtt_s=0.6)
    assert policy.update(3.0 + FEC_OFF_S - 1, loss=0.0, rtt_s=0.6)
    assert not policy.update(3.0 + FEC_OFF_S, loss=0.0, rtt_s=0.6)
    assert FecPolicy("on").update(0.0, loss=None, rtt_s=None)
    assert not FecPolicy("off").update(0.0, loss=0.5, rtt_s=1.0)


OFFER = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0", "a=group:BUNDLE 0 1 2",
    "m=audio 9 UDP/TLS/RTP/SAVPF 96", "a=mid:0", "a=sendonly", "a=rtpmap:96 opus/48000/2",
    "m=video 9 UDP/TLS/RTP/SAVPF 97 98", "a=mid:1", "a=sendonly", "a=rtpmap:97 VP8/90000",
    "a=rtcp-fb:97 nack", "a=rtpmap:98 rtx/90000", "a=fmtp:98 apt=97", "a=ssrc:1 cname:x",
    "m=video 9 UDP/TLS/RTP/SAVPF 97 98", "a=mid:2", "a=inactive", "a=rtpmap:97 VP8/90000",
    "a=rtpmap:98 rtx/90000", "a=fmtp:98 apt=97", ""])


def test_the_offer_adds_red_and_ulpfec_to_each_video_line_it_sends_on() -> None:
    offered = offer_fec(OFFER)
    lines = offered.split("\r\n")
    assert f"m=video 9 UDP/TLS/RTP/SAVPF 97 98 {RED_PT} {ULPFEC_PT}" in lines
    assert lines.count(f"a=rtpmap:{RED_PT} red/90000") == 1
    assert lines.index(f"a=rtpmap:{RED_PT} red/90000") < lines.index("a=ssrc:1 cname:x")
    assert "m=audio 9 UDP/TLS/RTP/SAVPF 96" in lines  # audio: Opus's own FEC
    assert offer_fec(offered) == offered
    # Chromium's answer keeps them (here: the offer read as an answer); one that drops them
    # (aiortc's) gets none.
    assert fec_accepted(offered) == {"1": (RED_PT, ULPFEC_PT)}
    assert fec_accepted(OFFER) == {}
