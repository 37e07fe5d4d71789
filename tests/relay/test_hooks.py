"""The start-up check of aiortc's private hooks, and the codec facts (codec.rtp) the relay
reads from payloads."""

from __future__ import annotations

from typing import Any

import aioice.ice
import aiortc
import pytest

from codec.rtp import h264_is_keyframe_start, vp8_is_keyframe_start, vp8_keyframe_size
from relay import hooks
from relay.errors import HookMissing


async def test_the_hooks_of_the_pinned_aiortc_are_all_there() -> None:
    await hooks.check()


async def test_another_aiortc_version_stops_the_relay_with_a_clear_message(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aiortc, "__version__", "1.17.0")
    with pytest.raises(HookMissing, match=r"needs aiortc 1\.16\.x, found 1\.17\.0"):
        await hooks.check()


async def test_a_missing_private_hook_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aiortc.RTCRtpReceiver, "_send_rtcp_pli")
    with pytest.raises(HookMissing, match=r"RTCRtpReceiver\._send_rtcp_pli"):
        await hooks.check()


async def test_another_aioice_version_stops_the_relay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice, "__version__", "0.14.0")
    with pytest.raises(HookMissing, match=r"needs aioice 0\.13\.x, found 0\.14\.0"):
        await hooks.check()


async def test_a_missing_aioice_internal_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(aioice.ice.Connection, "data_received")
    with pytest.raises(HookMissing, match=r"binds its UDP ports through: "
                                          r"Connection\.data_received"):
        await hooks.check()


async def test_host_sockets_bound_elsewhere_stop_the_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An aioice whose get_component_candidates no longer binds the host sockets (or takes
    # other arguments) would leave the relay's sockets outside its ports without a word.
    async def moved(self: Any, component: int, addresses: list[str],
                    timeout: int = 5) -> list[Any]:
        return []

    monkeypatch.setattr(hooks, "_original_component_candidates", moved)
    with pytest.raises(HookMissing, match="host sockets bound in "
                                          r"Connection\.get_component_candidates"):
        await hooks.check()

    async def renamed(self: Any, component: int, hosts: list[str]) -> list[Any]:
        return []

    monkeypatch.setattr(hooks, "_original_component_candidates", renamed)
    with pytest.raises(HookMissing, match=r"get_component_candidates\(component, addresses, "
                                          r"timeout\)"):
        await hooks.check()


def test_vp8_keyframes_are_recognised_from_the_payload() -> None:
    # Descriptor: X=1, S=1, PID=0; I=1 with a 15-bit picture id; then a keyframe header.
    keyframe = bytes([0x90, 0x80, 0x81, 0x23]) + bytes([0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A,
                                                        0x80, 0x02, 0xE0, 0x01])
    assert vp8_is_keyframe_start(keyframe)
    assert vp8_keyframe_size(keyframe) == (640, 480)
    interframe = bytes([0x90, 0x80, 0x81, 0x24, 0x11, 0x02, 0x00])
    assert not vp8_is_keyframe_start(interframe)
    continuation = bytes([0x80, 0x80, 0x81, 0x23, 0x10])  # S=0
    assert not vp8_is_keyframe_start(continuation)
    assert not vp8_is_keyframe_start(b"")


def test_h264_idr_and_sps_start_a_keyframe() -> None:
    assert h264_is_keyframe_start(bytes([0x65, 0x88]))  # IDR slice
    assert h264_is_keyframe_start(bytes([0x67, 0x42]))  # SPS
    assert not h264_is_keyframe_start(bytes([0x41, 0x9A]))  # non-IDR slice
    stap_a = bytes([0x78, 0x00, 0x02, 0x67, 0x42, 0x00, 0x02, 0x68, 0xCE])
    assert h264_is_keyframe_start(stap_a)
    assert h264_is_keyframe_start(bytes([0x7C, 0x85, 0x00]))  # FU-A start of an IDR
    assert not h264_is_keyframe_start(bytes([0x7C, 0x45, 0x00]))  # FU-A end
