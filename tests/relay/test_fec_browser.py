"""FEC toward a real browser (relay/fec.py): the relay's ULPFEC in RED, rebuilt by Chromium's
own receiver. The relay offers RED and ULPFEC on the specialist's subscribe connection,
Chromium's answer keeps them, and with ``[relay] fec = "on"`` the district's camera goes to
the specialist in RED with a FEC packet every four to eight. Then one in ten of those media
packets is dropped at the relay's egress (after FEC was made, as a link would), and every
retransmission with it: a hole stays a hole unless the FEC rebuilds it. Chromium's stats say
it used FEC packets to rebuild them, and it decodes on without asking for a keyframe."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from playwright.async_api import Page

from codec.rtp import rtp_payload_offset
from relay.fec import RED_PT, FecPolicy
from telehealth.startup import SERVICES
from tests.support import run_server, write_config
from tests.web.browser import FLAGS, MEDIA, chromium, decoded_from, open_consultation

DROP_EVERY = 10
"""One media packet in this many toward the specialist never arrives (a group holds 4-8)."""
WINDOW_S = 8.0


async def inbound_video(page: Page) -> dict[str, Any]:
    """The specialist's inbound video stats (getStats: the one inbound-rtp of kind video)."""
    stats: dict[str, Any] = await page.evaluate(
        f"""async () => {{
          const pc = {MEDIA}.subscribePc;
          let found = {{}};
          (await pc.getStats()).forEach((s) => {{
            if (s.type === 'inbound-rtp' && s.kind === 'video') found = s;
          }});
          return found;
        }}""")
    return stats


async def test_chromium_rebuilds_the_packets_a_link_lost_from_the_relays_fec(
        tmp_path: Path) -> None:
    config = write_config(tmp_path, relay={"fec": "on"})
    async with chromium(FLAGS) as browser, run_server(config) as server:
        assert server.app is not None
        relay = server.app[SERVICES].embedded
        assert relay is not None
        district, specialist, consultation = await open_consultation(
            browser, server.url, server.token)
        try:
            subscriber = relay.rooms[consultation].participants["cardio1"].subscriber
            legs = [leg for leg in subscriber.legs if leg.subscription is not None
                    and leg.subscription.publication.source == "camera"]
            assert len(legs) == 1
            leg = legs[0]
            # Chromium's answer kept RED and ULPFEC, and FEC is on for the leg.
            assert leg.sender.red_pt == RED_PT and leg.ulpfec_pt is not None
            assert leg.fec is not None and leg.sender.fec_on
            ssrc = leg.sender.ssrc.to_bytes(4, "big")
            rtx_ssrc = int(getattr(leg.sender.sender, "_rtx_ssrc", 0)).to_bytes(4, "big")
            transport = leg.sender.sender.transport
            send_rtp = transport._send_rtp
            counts = {"media": 0, "dropped": 0, "fec": 0, "rtx_dropped": 0}

            async def lossy(data: bytes) -> None:
                payload_type = data[1] & 0x7F
                if data[8:12] == ssrc and payload_type in (RED_PT, leg.payload_type):
                    header = rtp_payload_offset(data)
                    if payload_type == RED_PT and data[header] & 0x7F == leg.ulpfec_pt:
                        counts["fec"] += 1
                    else:
                        counts["media"] += 1
                        if counts["media"] % DROP_EVERY == 0:
                            counts["dropped"] += 1
                            return
                elif data[8:12] == rtx_ssrc:
                    counts["rtx_dropped"] += 1  # its retransmissions: lost too
                    return
                await send_rtp(data)

            async def window(label: str) -> dict[str, int]:
                counts.update(media=0, dropped=0, fec=0, rtx_dropped=0)
                before = await inbound_video(specialist)
                frames = await decoded_from(specialist, "ref1")
                started = time.monotonic()
                transport._send_rtp = lossy
                try:
                    await asyncio.sleep(WINDOW_S)
                finally:
                    transport._send_rtp = send_rtp
                after = await inbound_video(specialist)
                fps = (await decoded_from(specialist, "ref1") - frames) / (
                    time.monotonic() - started)
                grew = {name: int(after.get(name, 0)) - int(before.get(name, 0))
                        for name in ("packetsLost", "nackCount", "pliCount", "firCount",
                                     "keyFramesDecoded", "freezeCount")}
                print(f"\n{label}, {WINDOW_S:.0f} s toward the specialist: {counts}; "
                      f"Chromium: {grew}, decoded {fps:.1f} fps")
                return {**counts, **grew, "fps": round(fps)}

            with_fec = await window("FEC on")
            assert leg.fec is not None
            print(f"the relay's FEC: {leg.fec.groups} groups, {leg.fec.protected} packets "
                  f"protected; pacer {subscriber.pacer.stats()}")
            assert with_fec["dropped"] >= 10 and with_fec["fec"] >= with_fec["media"] / 9
            # It asked for them, in vain (the last hole's retransmission may fall after the
            # window: 17 of 18 was seen).
            assert with_fec["rtx_dropped"] >= with_fec["dropped"] - 2
            assert with_fec["packetsLost"] >= with_fec["dropped"] * 0.9  # lost on the link
            # Rebuilt from FEC, every one: no keyframe asked for, none needed, no freeze.
            assert with_fec["pliCount"] + with_fec["firCount"] == 0, with_fec
            assert with_fec["keyFramesDecoded"] == 0, with_fec
            assert with_fec["fps"] >= 10, with_fec

            # The same loss without FEC: the holes stay, Chromium asks for keyframes.
            subscriber.fec = FecPolicy("off")
            leg.set_fec(False)
            without = await window("FEC off")
            assert without["dropped"] >= 10
            assert without["pliCount"] + without["firCount"] > 0, without
        finally:
            for page in (district, specialist):
                await page.context.close()
