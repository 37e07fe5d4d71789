"""Publisher: the publishing side of one participant. Each publish call is one peer connection
(the client offers, the relay answers) carrying one Publication per audio/video m-line. It owns
those connections and publications, and reports each publication that comes or goes to the
callbacks its owner handed it."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import OperationError
from aiortc.sdp import SessionDescription

from relay import hooks
from relay.config import MediaConfig
from relay.errors import AlreadyPublished, BadSdp, NotInRoom, RelayError, UnsupportedCodec
from relay.publication import SOURCES, Publication
from relay.sdp import (
    accepted_codecs,
    announce,
    chosen_codecs,
    media_sections,
    offered_unsupported,
    parse_sdp,
    peer_connection,
)

logger = logging.getLogger(__name__)

PublicationCallback = Callable[[Publication], None]


class Publisher:
    def __init__(self, room_id: str, participant_id: str, config: MediaConfig, *,
                 added: PublicationCallback, removed: PublicationCallback) -> None:
        self.room_id = room_id
        self.participant_id = participant_id
        self.config = config
        self.connections: dict[str, RTCPeerConnection] = {}
        """Publish peer connections by transport id."""
        self.publications: dict[str, Publication] = {}
        """By source."""
        self.closed = False
        self._added = added
        self._removed = removed
        self._label = f"Publisher({room_id}/{participant_id})"

    async def publish(self, sdp: object, sources: dict[str, str]) -> dict[str, Any]:
        """Answer a publish offer: ``{transport_id, type: "answer", sdp, publications}``."""
        offer = parse_sdp(sdp, "offer")
        wanted = self._wanted(offer, sources)
        transport_id = f"pub_{uuid.uuid4().hex[:12]}"
        pc = peer_connection(self.config, f"{self._label} {transport_id}")
        try:
            for media in media_sections(offer):
                transceiver = pc.addTransceiver(media.kind, direction="recvonly")
                transceiver.setCodecPreferences(
                    accepted_codecs(media.kind, self.config.video_codecs))
            await pc.setRemoteDescription(RTCSessionDescription(sdp=str(sdp), type="offer"))
            answer = await pc.createAnswer()
            with hooks.relay_gathering():  # on the relay's UDP ports (relay/udp_mux.py)
                await pc.setLocalDescription(answer)
        except OperationError:
            # aiortc refuses an offer only for want of a common codec (an H.264 profile the
            # relay cannot take): the codec names were checked in _wanted.
            await pc.close()
            raise self._unsupported(next(iter(wanted)), "no profile the relay takes") from None
        except RelayError:  # no UDP port left for this connection (media_ports_exhausted)
            await pc.close()
            raise
        except Exception as exc:
            await pc.close()
            raise BadSdp(f"the offer cannot be answered: {exc}") from None
        codecs = chosen_codecs(pc.localDescription.sdp)
        made = [
            Publication(
                publication_id=f"pubn_{uuid.uuid4().hex[:12]}", room_id=self.room_id,
                participant_id=self.participant_id, source=wanted[transceiver.mid],
                kind=transceiver.kind, codec=codecs[transceiver.mid],
                receiver=transceiver.receiver,
                keyframe_interval_s=self.config.keyframe_interval_s)
            for transceiver in pc.getTransceivers()
            if transceiver.mid is not None and transceiver.mid in wanted
        ]
        self.connections[transport_id] = pc
        for publication in made:
            self.publications[publication.source] = publication
        logger.info("%s publishes %s over %s", self._label, ", ".join(p.source for p in made),
                    transport_id)
        for publication in made:
            self._added(publication)
        return {
            "transport_id": transport_id,
            "sdp": announce(pc.localDescription.sdp, self.config),
            "type": "answer",
            "publications": [p.to_wire() for p in made],
        }

    def _wanted(self, offer: SessionDescription, sources: dict[str, str]) -> dict[str, str]:
        """The source each audio/video m-line of the offer publishes, by mid, checked."""
        wanted: dict[str, str] = {}
        for media in media_sections(offer):
            mid = media.rtp.muxId
            source = sources.get(mid)
            if source is None:
                raise BadSdp(f"m-line {mid!r} ({media.kind}) has no source; give sources "
                             "{mid: 'microphone'|'camera'|'screen'}")
            if SOURCES.get(source) != media.kind:
                raise BadSdp(f"source {source!r} cannot be sent on a {media.kind} m-line")
            if source in self.publications or source in wanted.values():
                raise AlreadyPublished(f"participant {self.participant_id!r} already publishes "
                                       f"{source!r}; unpublish it first")
            if media.direction not in ("sendonly", "sendrecv"):
                raise BadSdp(f"m-line {mid!r} does not send (direction {media.direction})")
            if offered_unsupported(media, accepted_codecs(media.kind, self.config.video_codecs)):
                offered = ", ".join(sorted({c.mimeType for c in media.rtp.codecs})) or "none"
                raise self._unsupported(mid, f"it offers {offered}")
            wanted[mid] = source
        if not wanted:
            raise BadSdp("the offer has no audio or video m-line to publish")
        return wanted

    def _unsupported(self, mid: str, why: str) -> UnsupportedCodec:
        return UnsupportedCodec(
            f"no common codec on m-line {mid!r} ({why}): the relay accepts "
            f"{', '.join(self.config.video_codecs)} video and Opus audio")

    def connection(self, transport_id: str) -> RTCPeerConnection | None:
        return self.connections.get(transport_id)

    async def unpublish(self, source: str) -> None:
        publication = self.publications.pop(source, None)
        if publication is None:
            raise NotInRoom(f"participant {self.participant_id!r} does not publish {source!r}")
        self._end(publication)
        # Close the publish connection once none of its publications is left.
        for transport_id, pc in list(self.connections.items()):
            receivers = {t.receiver for t in pc.getTransceivers()}
            if publication.receiver in receivers and not any(
                p.receiver in receivers for p in self.publications.values()
            ):
                del self.connections[transport_id]
                await pc.close()

    def _end(self, publication: Publication) -> None:
        publication.close()
        self._removed(publication)

    async def close(self) -> None:
        """End every publication (each reported once) and close the connections."""
        if self.closed:
            return
        self.closed = True
        publications = list(self.publications.values())
        self.publications.clear()
        for publication in publications:
            self._end(publication)
        pcs = list(self.connections.values())
        self.connections.clear()
        await asyncio.gather(*(pc.close() for pc in pcs), return_exceptions=True)
