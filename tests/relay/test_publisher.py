"""relay.publisher: answering publish offers from a real aiortc peer, the typed refusals, and
each publication reported to the owner exactly once when it comes and when it goes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender

from relay.config import MediaConfig
from relay.errors import AlreadyPublished, BadSdp, NotInRoom, UnsupportedCodec
from relay.publication import Publication
from relay.publisher import Publisher
from relay.sdp import Codec
from tests.media import CounterTrack, ToneTrack
from tests.relay.loopback import loopback


class Owner:
    def __init__(self) -> None:
        self.added: list[Publication] = []
        self.removed: list[Publication] = []


@pytest.fixture
async def publisher() -> AsyncIterator[tuple[Publisher, Owner]]:
    owner = Owner()
    with loopback():
        made = Publisher("r", "north", MediaConfig(video_codecs=["VP8"]),
                         added=owner.added.append, removed=owner.removed.append)
        yield made, owner
        await made.close()


@pytest.fixture
async def published(publisher: tuple[Publisher, Owner]
                    ) -> tuple[Publisher, Owner, dict[str, Any]]:
    """A publisher that answered a microphone and camera offer; the answer."""
    made, owner = publisher
    sdp, sources = await client_offer()
    return made, owner, await made.publish(sdp, sources)


async def client_offer(*, audio: bool = True, video_codec: str = "VP8") -> tuple[str,
                                                                                 dict[str, str]]:
    """A publish offer from a plain aiortc peer and the sources of its m-lines."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        sources = {}
        if audio:
            sources["0"] = "microphone"
            pc.addTransceiver(ToneTrack(), direction="sendonly")
        video = pc.addTransceiver(CounterTrack(), direction="sendonly")
        capabilities = RTCRtpSender.getCapabilities("video")
        assert capabilities is not None
        video.setCodecPreferences([c for c in capabilities.codecs if c.mimeType.lower() in (
            f"video/{video_codec.lower()}", "video/rtx")])
        await pc.setLocalDescription(await pc.createOffer())
        sources[video.mid or ""] = "camera"
        return pc.localDescription.sdp, sources
    finally:
        await pc.close()


async def test_an_offer_is_answered_with_one_typed_publication_per_m_line(
    published: tuple[Publisher, Owner, dict[str, Any]],
) -> None:
    made, owner, answer = published
    assert answer["type"] == "answer" and answer["transport_id"] in made.connections
    assert [p["source"] for p in answer["publications"]] == ["microphone", "camera"]
    camera = made.publications["camera"]
    assert camera.codec == Codec("video/VP8", 90000)
    assert made.publications["microphone"].codec.mime_type.lower() == "audio/opus"
    assert owner.added == [made.publications["microphone"], camera]


async def test_an_offer_without_a_codec_the_relay_takes_is_refused_as_unsupported(
    publisher: tuple[Publisher, Owner],
) -> None:
    made, owner = publisher
    sdp, sources = await client_offer(audio=False, video_codec="H264")
    with pytest.raises(UnsupportedCodec, match=r"m-line '0' \(it offers video/H264, "
                                               r"video/rtx\): the relay accepts VP8"):
        await made.publish(sdp, sources)
    assert not made.connections and not owner.added


async def test_a_second_camera_and_a_missing_source_are_refused(
    published: tuple[Publisher, Owner, dict[str, Any]],
) -> None:
    made, _, _ = published
    sdp, sources = await client_offer()
    with pytest.raises(AlreadyPublished, match="already publishes 'microphone'"):
        await made.publish(sdp, sources)
    with pytest.raises(BadSdp, match="has no source"):
        await made.publish(sdp, {})
    with pytest.raises(NotInRoom, match="'screen'"):
        await made.unpublish("screen")


async def test_unpublishing_the_last_publication_of_a_connection_closes_it(
    published: tuple[Publisher, Owner, dict[str, Any]],
) -> None:
    made, owner, answer = published
    pc = made.connections[answer["transport_id"]]
    camera = made.publications["camera"]
    await made.unpublish("camera")
    assert camera.closed and owner.removed == [camera]
    assert pc.connectionState != "closed"
    microphone = made.publications["microphone"]
    await made.unpublish("microphone")
    assert owner.removed == [camera, microphone]
    assert pc.connectionState == "closed" and not made.connections


async def test_closing_ends_every_publication_once(
    published: tuple[Publisher, Owner, dict[str, Any]],
) -> None:
    made, owner, _ = published
    publications = list(made.publications.values())
    await made.close()
    await made.close()
    assert owner.removed == publications
    assert all(p.closed for p in publications)
    assert not made.connections and not made.publications
