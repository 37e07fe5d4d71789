"""Fuzzed socket.io input (#10) against a real server process while a bystander consultation
chats: every client event of docs/protocol.md with shaped payloads (the right keys, wrong types,
huge or empty strings, unicode, nested junk) and arbitrary JSON, odd event names (numbers, null,
booleans, arrays, ``*``, the reserved ``connect``/``disconnect``) and raw socket.io packets.

What must hold: every event sent with an ack id is answered ``{"ok": true}`` or an error ack
whose code is not ``internal`` (or, for a packet larger than any payload the protocol allows, a
closed connection); the server logs no traceback and no ERROR; the bystanders receive nothing
but their own chat and lose none of it; the hostile connection receives nothing about them.

Examples: ``TELEHEALTH_FUZZ_EXAMPLES`` (default 60, a few seconds); problems are collected over
every example and reported together, grouped by what went wrong (no shrinking: each example costs
a round trip to a real server).

    TELEHEALTH_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/signaling/test_fuzz.py -q
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from config.settings import load_settings
from signaling.directory import Directory
from signaling.tokens import TokenAuthority
from tests.abuse import (
    BYSTANDER_SPECIALTY,
    BYSTANDERS,
    HOSTILE,
    HOSTILE_HOST,
    HOSTILE_SPECIALTY,
    QUIET_QUEUE,
    Answer,
    ChatProbe,
    RawSocket,
    log_faults,
    open_consultation,
)
from tests.support import SECRET, Client, ServerProcess, start_server_process, write_config

EXAMPLES = int(os.environ.get("TELEHEALTH_FUZZ_EXAMPLES", "60"))
PACE_S = 0.02
"""Between examples, so that a per-connection event rate limit is rarely what answers."""
BIG = 64 * 1024
"""A packet longer than any payload the protocol allows may be answered by closing the socket."""
ACK_WAIT_S = 5.0
"""How long an ack may take (the server answers in milliseconds on an idle machine)."""
ACK_WAIT_AFTER_MISSES_S = 0.5
"""Once three acks went missing (a finding, not a slow machine), waits shorten to this."""
PROBE_RATE = 0.8
"""Bystander chat messages per second (both bystanders in turn) while the fuzzer runs: under
``limits.chat_per_minute`` (30 a clinician by default)."""

NO_ACK = ("no ack at all (#10 findings 1 and 4: reserved or odd event names dropped; or the "
          "connection wedged after a malformed packet, see the log)")

T = TypeVar("T")

# -- what the fuzzer sends ---------------------------------------------------------------------

HUGE = ["x" * 4001, "é" * 3000, "x" * 20_001, "x" * (BIG + 10), "\u202e" * 100]
ODD_TEXT = ["", " ", "\n", "\u0000", "\ud800", "Nguyễn Văn A", "🩺" * 10, "../../etc/passwd",
            "<script>", "{\"$ne\": 1}", "null", "-1", "1e999"]
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(), st.text(max_size=30), st.sampled_from(ODD_TEXT), st.sampled_from(HUGE),
)
junk = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@dataclass
class Known:
    """Real ids of the run, so that shaped payloads reach past the schema."""

    ids: list[str] = field(default_factory=list)


KNOWN = Known()


def real_id() -> st.SearchStrategy[Any]:
    return st.sampled_from(range(8)).map(
        lambda i: KNOWN.ids[i % len(KNOWN.ids)] if KNOWN.ids else "x")


ids = st.one_of(real_id(), st.sampled_from(["", "a" * 65, "req_missing", "con_missing", "d2",
                                            "c1", "k1", "bad id"]), scalars)
CANDIDATES = [
    {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"},
    {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host", "sdpMid": "0"},
    {"candidate": "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host", "sdpMLineIndex": 0},
    {"candidate": "not a candidate", "sdpMid": "0", "sdpMLineIndex": 0},
    {"candidate": "", "sdpMid": "9", "sdpMLineIndex": 64},
    {"candidate": "candidate:x 1 tcp 1 ::1 0 typ relay", "sdpMid": "0", "sdpMLineIndex": 0},
]
SDPS = ["v=0\r\n", "v=0\r\no=- 0 0 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF "
        "96\r\na=mid:0\r\na=rtpmap:96 VP8/90000\r\n", "garbage", "x" * 65_537]
FIELD = {
    "specialty": st.one_of(st.sampled_from([HOSTILE_SPECIALTY, "Cardiology", "x" * 64]), scalars),
    "priority": st.one_of(st.sampled_from(["routine", "urgent", "asap", "stat", "STAT"]), scalars),
    "reason": st.one_of(st.text(max_size=50), scalars),
    "patient_pseudonym": st.one_of(st.sampled_from(["P-1", "Nguyễn Văn A 1970"]), scalars),
    "request_id": ids, "consultation_id": ids, "site_id": ids, "transport_id": ids,
    "text": st.one_of(st.text(max_size=50), scalars),
    "conclusion": st.one_of(st.text(max_size=50), scalars),
    "sdp": st.one_of(st.sampled_from(SDPS), scalars),
    "sources": st.one_of(st.dictionaries(st.sampled_from(["0", "1", "a b", ""]), st.sampled_from(
        ["camera", "microphone", "screen", "x"]), max_size=4), junk),
    "source": st.one_of(st.sampled_from(["camera", "microphone", "screen"]), scalars),
    "candidate": st.one_of(st.sampled_from(CANDIDATES), junk),
    "audio_only": st.one_of(st.booleans(), scalars),
    "agree": st.one_of(st.booleans(), scalars),
    "type": st.one_of(st.sampled_from(["offer", "answer", "pranswer", ""]), scalars),
}
EVENTS: dict[str, tuple[str, ...]] = {
    "consult:request": ("specialty", "priority", "reason", "patient_pseudonym"),
    "consult:cancel": ("request_id",),
    "queue:get": (),
    "consult:accept": ("request_id",),
    "consult:join": ("consultation_id",),
    "consult:leave": ("consultation_id",),
    "consult:invite": ("consultation_id", "site_id"),
    "chat:send": ("consultation_id", "text"),
    "consult:end": ("consultation_id", "conclusion"),
    "presence:list": (),
    "media:join": ("consultation_id",),
    "media:publish": ("consultation_id", "sdp", "sources"),
    "media:unpublish": ("consultation_id", "source"),
    "media:subscribe": ("consultation_id",),
    "media:answer": ("consultation_id", "transport_id", "sdp"),
    "media:ice": ("consultation_id", "transport_id", "candidate"),
    "media:mode": ("consultation_id", "audio_only"),
    "media:ice_servers": ("consultation_id",),
    "media:probe": ("consultation_id", "sdp", "type"),
    "recording:consent": ("consultation_id", "agree"),
    "recording:start": ("consultation_id",),
    "recording:stop": ("consultation_id",),
}
RESERVED = ["connect", "disconnect", "connect_error", "message", "*", "", " ", "__proto__",
            "consult:join ", "CHAT:SEND", "x" * 300]


@dataclass(frozen=True)
class Case:
    kind: str
    """``shaped``, ``arbitrary``, ``odd_name`` or ``raw``."""
    text: str
    """The socket.io packet after its type and ack id."""
    acked: bool
    """Whether the packet is a well-formed EVENT with an ack id (an answer is owed)."""
    label: str

    def packet(self, ack_id: int) -> str:
        return f"2{ack_id}{self.text}" if self.acked else self.text


def _event(kind: str, name: Any, args: list[Any]) -> Case:
    text = json.dumps([name, *args])
    return Case(kind, text, True, f"{kind} {json.dumps(name)[:40]} {text[:160]}")


@st.composite
def shaped(draw: st.DrawFn) -> Case:
    name = draw(st.sampled_from(sorted(EVENTS)))
    keys = EVENTS[name]
    payload = draw(st.fixed_dictionaries({}, optional={k: FIELD[k] for k in keys}))
    if draw(st.integers(0, 9)) == 0:
        payload[draw(st.text(min_size=1, max_size=8))] = draw(scalars)
    return _event("shaped", name, [payload])


@st.composite
def arbitrary(draw: st.DrawFn) -> Case:
    name = draw(st.sampled_from(sorted(EVENTS)))
    return _event("arbitrary", name, draw(st.lists(junk, max_size=3)))


@st.composite
def odd_name(draw: st.DrawFn) -> Case:
    name = draw(st.one_of(st.sampled_from(RESERVED), st.integers(), st.none(), st.booleans(),
                          st.floats(allow_nan=False), st.lists(scalars, max_size=3),
                          st.dictionaries(st.text(max_size=5), scalars, max_size=2),
                          st.text(max_size=20)))
    args = draw(st.lists(junk, max_size=2))
    if name == "connect" and draw(st.booleans()):
        args = [{"token": draw(st.sampled_from(["forged", "", "x.y.z"]))}]
    return _event("odd_name", name, args)


RAW_ACKED = ["[null]", "[1]", "[[]]", "[{}]", '["queue:get",{},{}]', "[\"*\", {}]",
             '["disconnect"]', '["connect", {"token": "forged"}]']
"""EVENT packets with an ack id and an array whose first item is the event name: owed an ack."""
RAW_OTHER = ["2", "2[", "21[]", "21{}", "21\"x\"", "211", "21null", "2abc", "2[\"queue:get\"",
             "21", "2999999999999999999999[\"x\"]",
             "3", "31[]", "3999[\"x\"]", "5999-[\"x\",{\"_placeholder\":true,\"num\":0}]",
             "51-[\"x\",{\"_placeholder\":true,\"num\":0}]", "6", "9", "x", "2/nowhere,[\"x\"]",
             "2/relay,5[\"relay:heartbeat\",{}]", "0/relay,{}", "4{}", "3/,1[]"]


@st.composite
def raw(draw: st.DrawFn) -> Case:
    if draw(st.booleans()):
        text = draw(st.sampled_from(RAW_ACKED))
        return Case("raw", text, True, f"raw 2<id>{text[:80]}")
    text = draw(st.one_of(st.sampled_from(RAW_OTHER), st.text(max_size=30)))
    return Case("raw", text, False, f"raw {text[:80]!r}")


cases = st.one_of(shaped(), arbitrary(), odd_name(), raw())


def known_faults() -> list[Case]:
    """The faults #10 found, always tried first (ids of this run: hostile request,
    consultation, subscribe transport)."""
    consultation = KNOWN.ids[3]
    transport = KNOWN.ids[4] if len(KNOWN.ids) > 4 else "x"
    host = "candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host"
    return [
        _event("known", "media:ice", [{"consultation_id": consultation,
                                       "transport_id": transport, "candidate": {
                                           "candidate": host}}]),
        _event("known", "media:subscribe", [{"consultation_id": consultation}]),
        _event("known", "disconnect", [{}]),
        _event("known", "connect", [{"token": "forged"}]),
        _event("known", "*", [{}]),
        _event("known", 7, [{}]),
        _event("known", None, [{}]),
        _event("known", [], [{}]),
        # A packet announcing one binary attachment, then text: the attachment never comes.
        Case("raw", '51-["x",{"_placeholder":true,"num":0}]', False, "raw 51-[...] (binary "
             "event header, no attachment follows)"),
        _event("known", "queue:get", [{}]),
    ]

# -- the environment: a server process, a loop in a thread, the bystanders and the fuzzer -----


class Fuzzing:
    """A server process with a bystander consultation chatting and a hostile clinician whose
    packet-level socket sends each case."""

    def __init__(self, tmp: Path) -> None:
        config = write_config(tmp, queue=QUIET_QUEUE)
        settings_ = load_settings(config)
        assert settings_.directory.file is not None
        self.tokens = TokenAuthority(SECRET, Directory.load(settings_.directory.file), 3600)
        self.server: ServerProcess = start_server_process(config)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.clients: dict[str, Client] = {}
        self.sock: RawSocket | None = None
        self.probe: ChatProbe | None = None
        self.problems: dict[str, list[str]] = {}
        self.secrets: list[str] = []
        self.hostile_consultation = ""
        self.rate_limited = 0
        self.after_raw = False

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def problem(self, what: str, detail: str) -> None:
        self.problems.setdefault(what, []).append(detail)

    async def setup(self) -> None:
        for name in (*BYSTANDERS, HOSTILE, HOSTILE_HOST):
            self.clients[name] = await Client(self.server.url, self.tokens.issue(name)).connect()
        c = self.clients
        b_request, b_consultation = await open_consultation(
            c[BYSTANDERS[0]], c[BYSTANDERS[1]], BYSTANDER_SPECIALTY, "bystander consultation")
        h_request, h_consultation = await open_consultation(
            c[HOSTILE], c[HOSTILE_HOST], HOSTILE_SPECIALTY, "hostile consultation")
        self.hostile_consultation = h_consultation
        self.secrets = [b_request, b_consultation]
        KNOWN.ids[:] = [b_request, b_consultation, h_request, h_consultation]
        await self.fuzzer()
        await asyncio.sleep(0.3)
        for client in c.values():
            for event in list(client.events):
                client.drain(event)
        pair = [c[BYSTANDERS[0]], c[BYSTANDERS[1]]]
        self.probe = ChatProbe(pair, pair, b_consultation, PROBE_RATE)
        self.probe.start()

    async def fuzzer(self) -> RawSocket:
        """The hostile connection, signed in, joined, with media joined and a subscribe offer
        pending (its transport id is a known id)."""
        if self.sock is not None and not self.sock.closed:
            return self.sock
        if self.sock is not None:
            await self.sock.close()
        self.sock = RawSocket(self.server.url, self.tokens.issue(HOSTILE))
        assert await self.sock.connect(), self.sock.refusal
        ref = {"consultation_id": self.hostile_consultation}
        for event in ("consult:join", "media:join", "media:subscribe"):
            answer = await self.sock.call(event, ref, timeout=10)
            if answer.code == "ok" and event == "media:subscribe":
                transport = answer.ack.get("transport_id")
                if isinstance(transport, str) and transport not in KNOWN.ids:
                    KNOWN.ids.append(transport)
        return self.sock

    async def send(self, case: Case) -> None:
        sock = await self.fuzzer()
        if not case.acked:
            await sock.send_packet(case.text)
            self.after_raw = True
            await asyncio.sleep(0.05)
            return
        after_raw, self.after_raw = self.after_raw, False
        ack_id = sock.ack_id()
        misses = len(self.problems.get(NO_ACK, ()))
        answer: Answer = await sock.answer(sock.send_packet(case.packet(ack_id), ack_id),
                                          ACK_WAIT_S if misses < 3 else ACK_WAIT_AFTER_MISSES_S)
        code = answer.code
        if code == "unauthenticated":
            self.problem("a signed-in connection answered unauthenticated afterwards (a "
                         "reserved event name signed it out; #10 finding 1)", case.label)
            await sock.close()
        elif code == "rate_limited":
            self.rate_limited += 1
        elif code == "internal":
            self.problem("answered internal (a fault the server should refuse; #10 finding 3)",
                         case.label)
        elif code == "timeout":
            self.problem(NO_ACK, case.label)
        elif code == "malformed":
            self.problem("an ack that is neither {ok: true} nor {error: {code, message}}",
                         f"{case.label} -> {answer.ack!r:.200}")
        elif code == "closed" and len(case.text) <= BIG and not self.rate_limited \
                and not after_raw:  # a malformed packet before may close the connection
            self.problem("connection closed without an ack", case.label)
        await asyncio.sleep(PACE_S)

    async def finish(self) -> None:
        assert self.probe is not None
        await self.probe.stop()
        sock = await self.fuzzer()
        answer = await sock.call("queue:get", {})
        if answer.code not in ("ok", "rate_limited"):
            self.problem("the hostile connection is not served after the fuzz", repr(answer))
        await asyncio.sleep(0.3)

    async def close(self) -> None:
        if self.sock is not None:
            await self.sock.close()
        for client in self.clients.values():
            await client.close()


@pytest.fixture
def fuzzing(tmp_path: Path) -> Iterator[Fuzzing]:
    env = Fuzzing(tmp_path)
    try:
        env.run(env.setup())
        yield env
    finally:
        try:
            env.run(env.close(), timeout=20)
        finally:
            env.loop.call_soon_threadsafe(env.loop.stop)
            env.thread.join(5)
            env.server.kill()


@pytest.mark.timeout(60 + 2 * EXAMPLES)
def test_fuzzed_events_are_answered_and_the_bystanders_see_nothing_and_lose_nothing(
    fuzzing: Fuzzing,
) -> None:
    log_start = len(fuzzing.server.output)
    started = time.monotonic()

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case: Case) -> None:
        fuzzing.run(fuzzing.send(case), timeout=30)

    for case in reversed(known_faults()):  # the outermost @example runs first
        fuzz = example(case=case)(fuzz)

    fuzz()
    fuzzing.run(fuzzing.finish())
    elapsed = time.monotonic() - started

    probe = fuzzing.probe
    assert probe is not None
    report: list[str] = []
    for what, labels in fuzzing.problems.items():
        report.append(f"{len(labels)} x {what}, e.g.:")
        report += [f"    {label}" for label in labels[:6]]
    output = fuzzing.server.output[log_start:]
    faults = log_faults(output)
    if faults:
        report.append(f"{len(faults)} traceback/ERROR lines in the server log (#10: client "
                      "faults log one INFO line), e.g.:")
        report += [f"    {line[:200]}" for line in faults[:4]]
        first = next(i for i, line in enumerate(output) if line.rstrip() in faults)
        report.append("the first of them in full:")
        report += [f"    {line.rstrip()[:200]}" for line in output[first:first + 25]]
    if probe.leaks:
        report.append(f"the bystanders received {len(probe.leaks)} events not their own chat:")
        report += [f"    {who} <- {event} {json.dumps(data)[:160]}"
                   for who, event, data in probe.leaks[:6]]
    if probe.lost() or probe.refused or not probe.sent:
        report.append(f"bystander chat: {len(probe.sent)} sent, lost {probe.lost()[:5]}, "
                      f"refused {dict(probe.refused)}")
    sock = fuzzing.sock
    told = [(e, d) for e, d in (sock.events if sock else [])
            if any(s in json.dumps(d) for s in fuzzing.secrets)]
    if told:
        report.append(f"the hostile connection heard about the bystanders: {told[:3]}")
    assert not report, (f"fuzzing {EXAMPLES} examples in {elapsed:.1f} s:\n" + "\n".join(report))
