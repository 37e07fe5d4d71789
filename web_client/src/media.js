// A participant's media in a consultation: one publish connection for camera + microphone,
// one for a shared screen, one subscribe connection the relay renegotiates. When something
// fails it follows docs/protocol.md ("When things fail"): media never passes through
// signaling, so a signaling reconnect, or the same relay found again, resumes the media on
// the connections that still carry it; a new relay, or connections that died by themselves,
// rebuild them; a consultation without a relay waits, and says so, until one takes it.

import { icePolicy } from "./settings.js";

const GATHER_WAIT_MS = 2000;
/** A connection `disconnected` this long while the page's link to the server is fine (the
 * path lost is media's alone: a firewall, the relay's address) is rebuilt. */
const DISCONNECTED_GRACE_MS = 2500;
/** While the page's whole link is out too (its socket away, or the server unanswered: a
 * satellite's outage of 5-10 s), the connections are not rebuilt but left to recover by
 * themselves: the relay keeps them ~30 s, and ICE's checks find the path again within a round
 * trip or two of its return, where a rebuild costs several round trips of signaling and ICE
 * (seconds at 700 ms). Once the server answers again they get `RECOVER_GRACE_MS`, and never
 * more than `DISCONNECTED_MAX_MS` from the first `disconnected` in all. */
const RECOVER_GRACE_MS = 4000;
const DISCONNECTED_MAX_MS = 15_000;
/** A `GET /healthz` answered within this says the link to the server is fine (LinkWatch's
 * "slow" bound in protocol.js: three round trips of a satellite hop). */
const SERVER_ANSWER_MS = 2500;
/** Between two probes while the link is out. */
const SERVER_RETRY_MS = 1000;
/** While the consultation has no relay, `media:join` is tried again this often: the server
 * says `media:moved` as soon as a relay takes it, this is only the fallback. */
const WAITING_RETRY_MS = 5000;
/** An hour of those retries at most; a `media:moved` with a relay still ends the wait after. */
const WAITING_RETRIES = 720;
/** Set-up attempts that fail in a row (not counting waits for a relay) before the room says
 * media failed; the pause between them doubles from 0.5 s up to 5 s. */
const MAX_FAILURES = 20;
/** Connections not up this long after they were set up are said to have no path to the relay
 * (TURN over a slow link connects in a few seconds). ICE goes on meanwhile and the notice goes
 * when they connect: on a loaded PC a connection can take longer, and starting it again would
 * only delay it more. Only a connection without a single local candidate (relay-only and the
 * TURN server unreachable: ICE never says "failed" then, it has nothing to check) is rebuilt. */
const CONNECT_DEADLINE_MS = 12_000;

/** Wait `ms`, or less if `until` (given the function that ends the wait) ends it first. The
 * wait's end is in `waits` while it lasts, so that closing the session can end it. */
function wait(ms, waits, until = () => {}) {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    const stop = until(done) || (() => {});
    function done() {
      clearTimeout(timer);
      stop();
      waits.delete(done);
      resolve();
    }
    waits.add(done);
  });
}

/** Wait (bounded) until the connection has gathered its candidates, so the SDP carries them. */
export function gathered(pc, waits) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return wait(GATHER_WAIT_MS, waits, (done) => {
    function check() { if (pc.iceGatheringState === "complete") done(); }
    pc.addEventListener("icegatheringstatechange", check);
    return () => pc.removeEventListener("icegatheringstatechange", check);
  });
}

/** The listeners a session registered (on its connections, tracks and the signaling session),
 * kept so that they can be removed again. */
class Listeners {
  constructor() {
    /** @type {{target: object, remove: () => void}[]} */
    this._entries = [];
  }

  /** `target.addEventListener(type, handler)`, remembered. */
  add(target, type, handler) {
    target.addEventListener(type, handler);
    this._entries.push({ target, remove: () => target.removeEventListener(type, handler) });
  }

  /** `signaling.on(event, handler)`, remembered. */
  addSignaling(signaling, event, handler) {
    signaling.on(event, handler);
    this._entries.push({ target: signaling, remove: () => signaling.off(event, handler) });
  }

  /** Remove the listeners registered on `target`. */
  removeFrom(target) {
    for (const entry of this._entries) if (entry.target === target) entry.remove();
    this._entries = this._entries.filter((entry) => entry.target !== target);
  }

  removeAll() {
    for (const entry of this._entries) entry.remove();
    this._entries = [];
  }

  get size() { return this._entries.length; }
}

/**
 * @typedef {{publication: import("./protocol.js").Publication, track: MediaStreamTrack, mid: string}} RemoteTrack
 */

/**
 * A send-only transceiver for one track. The camera goes out in three VP8 temporal layers
 * (L1T3: 7.5, 15 and 30 fps nested), so the relay can give a subscriber on a thin link a
 * lower frame rate without transcoding; a browser that refuses the mode sends one layer.
 */
function addSender(pc, track, stream, source) {
  const init = { direction: "sendonly", streams: [stream] };
  if (source === "camera" && track.kind === "video") {
    try {
      return pc.addTransceiver(track, { ...init, sendEncodings: [{ scalabilityMode: "L1T3" }] });
    } catch (error) {
      // Not supported here (an older browser, no VP8 temporal layers): one layer as before.
    }
  }
  return pc.addTransceiver(track, init);
}

export class MediaSession {
  /**
   * @param {import("./protocol.js").Signaling} signaling
   * @param {string} consultationId
   * @param {{onTrack: (t: RemoteTrack) => void, onTrackGone: (publicationId: string) => void,
   *          onState: (state: string) => void, onNotice: (notice: any) => void,
   *          onProblem?: (problem: ?("nopath"|"waiting")) => void,
   *          onRefusal?: (error: Error) => void}} handlers
   *   onState: "connecting", "connected", "reconnecting", "waiting" (the consultation has no
   *   relay now: `media:moved` with `relay: null`, or `media:join` answered `relay_waiting`)
   *   or "failed".
   *   onProblem: "nopath" when a connection to the relay failed (ICE found no path, even through
   *   TURN when the ack offered it), "waiting" while there is no relay, null once every
   *   connection is up again.
   *   onRefusal: the first refusal of a series of set-up attempts (the session retries).
   */
  constructor(signaling, consultationId, handlers) {
    this.signaling = signaling;
    this.consultationId = consultationId;
    this.handlers = handlers;
    this.iceServers = [];
    /** "relay" when the server (`ice_transport_policy`) or this browser's setting forces TURN. */
    this.iceTransportPolicy = "all";
    this.stream = null;       // camera + microphone
    this.screen = null;       // display capture
    this.publishPc = null;
    this.screenPc = null;
    this.subscribePc = null;
    this.subscribeId = null;
    this.tracks = {};          // mid -> publication
    this.muted = false;
    this.cameraOff = false;
    this.audioOnly = false;
    this.state = "idle";
    this.closed = false;
    /** True while the consultation has no relay (the room says so). */
    this.waiting = false;
    /** What stops the media now ("nopath", "waiting"), null when nothing does. */
    this.problem = null;
    /** Peer connections created, and `media:join` answers that kept them (`resumed`): a
     * resumed session creates none. */
    this.pcsCreated = 0;
    this.resumes = 0;
    this.stats = { inbound: {}, outbound: {}, rttMs: null, lossPct: 0, bitrateKbps: 0, quality: "good" };
    this._lastBytes = null;
    this._watchdog = null;
    this._watchId = 0;         // the disconnected watch under way (_watchDisconnected)
    this._connectDeadline = null;
    /** The next set-up wanted ({reason, resume, delayMs}), null when none; `_recover` sets it,
     * the loop `_recovering` serves it. */
    this._request = null;
    this._recovering = null;
    this._kick = null;         // ends the loop's current pause early
    this._statsTimer = null;
    this._waits = new Set();   // the ends of the waits under way (gathering, pauses)
    this._listeners = new Listeners();
    this._answering = Promise.resolve();
    /** Milestones of the current connection, for the quality panel and diagnosis. */
    this.timeline = [];
    const listeners = this._listeners;
    listeners.addSignaling(signaling, "media:offer", (offer) => {
      if (offer.consultation_id !== this.consultationId) return;
      this._answering = this._answering.then(() => this._answer(offer)).catch((e) => console.warn("offer", e));
    });
    listeners.addSignaling(signaling, "media:publication", (event) => {
      if (event.consultation_id === this.consultationId && event.event === "removed") {
        this.handlers.onTrackGone(event.publication.id);
      }
    });
    listeners.addSignaling(signaling, "media:notice", (notice) => {
      if (notice.consultation_id === this.consultationId) this.handlers.onNotice(notice);
    });
    listeners.addSignaling(signaling, "media:moved", (event) => {
      if (event.consultation_id !== this.consultationId) return;
      if (event.relay) {
        // The same relay found again answers `resumed` and nothing is rebuilt; a new one not.
        this._recover(`relay moved to ${event.relay.id}`, { resume: true });
      } else {
        this._enterWaiting();
        this._recover("no relay", { resume: true, delayMs: WAITING_RETRY_MS });
      }
    });
  }

  _setState(state) {
    if (state !== this.state) {
      this.state = state;
      this.handlers.onState(state);
    }
  }

  /** Start with a camera/microphone stream (may be null: receive only). Resolves once the
   * first set-up attempt is over (the session goes on retrying or waiting by itself). */
  start(stream) {
    this.stream = stream;
    this._statsTimer = setInterval(() => this._collectStats(), 1000);
    return new Promise((resolve) => {
      this._firstAttempt = resolve;
      this._recover("start", { resume: false });
    });
  }

  /** After the signaling connection came back and the consultation was joined again:
   * `media:join {resume: true}`, keeping the connections if the relay still carries them. */
  resume(reason = "signaling reconnected") {
    return this._recover(reason, { resume: true });
  }

  /** Tear the connections down and build them again (`media:join` without resume). */
  rebuild(reason) {
    return this._recover(reason, { resume: false });
  }

  /** How many listeners the session has registered and not removed yet (0 once closed). */
  get listenerCount() { return this._listeners.size; }

  _mark(label) {
    this.timeline.push([label, Math.round(performance.now())]);
  }

  /** Ask for the media to be set up again, with `resume` (keep the connections if the relay
   * still carries them) or without (close and rebuild), after `delayMs`. A request made while
   * one is served is merged into the next (a rebuild wins over a resume, the shorter delay
   * wins) and ends the loop's pause. */
  _recover(reason, { resume, delayMs = 0 }) {
    if (this.closed) return Promise.resolve();
    const pending = this._request;
    this._request = pending
      ? { reason, resume: resume && pending.resume, delayMs: Math.min(delayMs, pending.delayMs) }
      : { reason, resume, delayMs };
    if (this._kick) this._kick();
    if (!this._recovering) {
      this._recovering = this._recoverLoop().finally(() => { this._recovering = null; });
    }
    return this._recovering;
  }

  /** Serve set-up requests one at a time until none is left. Without a signaling connection
   * it stops and keeps the request: app.js calls `resume` once the socket is back and the
   * consultation joined again (a restarted server knows nothing before that). */
  async _recoverLoop() {
    let failures = 0;
    let waits = 0;
    while (!this.closed && this._request) {
      if (!this.signaling.connected) return;
      const request = this._request;
      if (request.delayMs > 0) {
        const pause = request.delayMs;
        request.delayMs = 0;
        await this._pause(pause);
        continue;  // the request may have changed meanwhile
      }
      this._request = null;
      try {
        await this._setUp(request);
        failures = 0;
        waits = 0;
      } catch (error) {
        if (this.closed) return;
        if (error && error.code === "relay_waiting") {
          this._mark("relay_waiting");
          // Connections that were to be rebuilt are dead: they go now, not when a relay comes.
          if (!request.resume) this._closePcs();
          this._enterWaiting();
          waits += 1;
          if (waits > WAITING_RETRIES) {
            console.warn("media: still no relay; retrying stops, media:moved will bring it back");
            return;
          }
          if (!this._request) {
            this._request = { reason: "waiting for a relay", resume: request.resume, delayMs: WAITING_RETRY_MS };
          }
        } else {
          failures += 1;
          console.warn(`media: set-up failed (${request.reason}, attempt ${failures}):`,
                       error && error.code, error && error.message);
          if (failures === 1 && this.handlers.onRefusal) this.handlers.onRefusal(error);
          if (failures >= MAX_FAILURES) {
            this._problem("nopath");
            this._setState("failed");
            return;
          }
          if (!this._request) {
            this._request = { reason: request.reason, resume: request.resume,
                              delayMs: Math.min(500 * 2 ** (failures - 1), 5000) };
          }
        }
      } finally {
        if (this._firstAttempt) { this._firstAttempt(); this._firstAttempt = null; }
      }
    }
  }

  /** Wait `ms`, or until `_recover` is asked again (or the session closes). */
  _pause(ms) {
    return wait(ms, this._waits, (done) => {
      this._kick = done;
      return () => { if (this._kick === done) this._kick = null; };
    });
  }

  /** One set-up: `media:join` (with resume when there are connections to keep), then keep
   * them when the relay answers `resumed`, else close them and build new ones. */
  async _setUp({ reason, resume }) {
    const keep = resume && this._hasPcs();
    if (this.state === "idle") this._setState("connecting");
    this._mark(`media:join${keep ? " resume" : ""} (${reason})`);
    const joined = await this.signaling.mediaJoin(this.consultationId, keep);
    this._mark(joined.resumed ? "media:join resumed" : "media:join");
    this.iceServers = joined.ice_servers || [];
    this.iceTransportPolicy = icePolicy(joined.ice_transport_policy);
    this._leaveWaiting();
    if (keep && joined.resumed) {
      // The relay still carries this participant's media: the connections stay as they are
      // (an offer that was on its way comes again as media:offer).
      this.resumes += 1;
      console.info(`media: resumed after ${reason}: connections kept`);
      if (this._allConnected()) {
        this._setState("connected");
        this._problem(null);
      } else {
        this._setState("reconnecting");
      }
      return;
    }
    if (this._hasPcs()) console.info(`media: rebuilding after ${reason}`);
    this._closePcs();
    try {
      await this._build();
    } catch (error) {
      this._closePcs();  // half a set-up is never kept: the next attempt starts afresh
      throw error;
    }
  }

  /** Whether there are connections a resumed session could keep. */
  _hasPcs() {
    const pcs = [this.publishPc, this.screenPc, this.subscribePc].filter(Boolean);
    return Boolean(this.subscribePc)
      && pcs.every((pc) => pc.connectionState !== "failed" && pc.connectionState !== "closed");
  }

  /** The consultation has no relay: the room says so, and the media comes back by itself. */
  _enterWaiting() {
    if (this.closed) return;
    if (!this.waiting) {
      console.info("media: waiting for a relay");
      this._mark("waiting");
    }
    this.waiting = true;
    // A restarted server answers relay_waiting until the relay dials in again, while that
    // relay still carries this room's media: video that plays is not "waiting" to a doctor.
    if (this._allConnected() && [this.publishPc, this.screenPc, this.subscribePc].some(Boolean)) return;
    this._setState("waiting");
    this._problem("waiting");
  }

  _leaveWaiting() {
    if (!this.waiting) return;
    this.waiting = false;
    this._mark("relay back");
    if (this.problem === "waiting") this._problem(null);
    if (this.state === "waiting") this._setState("connecting");
  }

  /** A connection died with no word from signaling (rule 4: the client's own link, or a
   * path only it lost): rebuild without resume. While waiting, the dead connections go at
   * once: the room shows no frozen picture. */
  _lost(reason) {
    if (this.waiting) this._closePcs();
    this._recover(reason, { resume: false });
  }

  async _build() {
    this._setState("connecting");
    // Receive and send are independent connections: set them up side by side.
    await Promise.all([
      this._subscribe(),
      this.stream ? this._publishCamera() : null,
      this.screen ? this._publish(this.screen, { video: "screen" }).then((pc) => { this.screenPc = pc; }) : null,
    ]);
    if (this.audioOnly) await this.signaling.mode(this.consultationId, true);
    clearTimeout(this._connectDeadline);
    this._connectDeadline = setTimeout(() => {
      if (this.closed || this._allConnected()) return;
      const pcs = [this.publishPc, this.screenPc, this.subscribePc].filter(Boolean);
      const stranded = pcs.some((pc) => !/^a=candidate:/m.test((pc.localDescription || {}).sdp || ""));
      console.warn(`media: not connected ${CONNECT_DEADLINE_MS} ms after set-up (policy `
                   + `${this.iceTransportPolicy}, ${this.iceServers.length} ICE servers, `
                   + `${stranded ? "a connection without local candidates" : "ICE still checking"})`);
      this._problem("nopath");
      if (stranded) this.rebuild("no local candidates");
    }, CONNECT_DEADLINE_MS);
  }

  _newPc() {
    this.pcsCreated += 1;
    return new RTCPeerConnection({
      iceServers: this.iceServers, iceTransportPolicy: this.iceTransportPolicy, bundlePolicy: "max-bundle",
    });
  }

  _watch(pc) {
    this._listeners.add(pc, "connectionstatechange", () => {
      const state = pc.connectionState;
      if (state === "connected") this._mark("pc connected");
      if (state === "connected" && this._allConnected() && !this.waiting) {
        this._setState("connected");
        this._problem(null);
      }
      if (state === "failed") {
        console.warn(`media: connection failed (ICE ${pc.iceConnectionState}, policy `
                     + `${this.iceTransportPolicy}, ${this.iceServers.length} ICE servers)`);
        if (!this.waiting) this._problem("nopath");
        this._lost("connection failed");
      }
      if (state === "disconnected") {
        this._mark("pc disconnected");
        if (!this.waiting) this._setState("reconnecting");
        this._watchDisconnected(pc);
      }
    });
  }

  /** `pc` went `disconnected`: rebuild after `DISCONNECTED_GRACE_MS` if the link to the server
   * is fine meanwhile, else wait for that link, then `RECOVER_GRACE_MS` for the connections to
   * recover by themselves, `DISCONNECTED_MAX_MS` in all (docs/protocol.md, rule 4). One watch
   * at a time: a later `disconnected` starts it again. */
  _watchDisconnected(pc) {
    clearTimeout(this._watchdog);
    const watch = ++this._watchId;
    const since = performance.now();
    const elapsed = () => performance.now() - since;
    const lost = () => !this.closed && watch === this._watchId && !this._allConnected()
      && [this.publishPc, this.screenPc, this.subscribePc].includes(pc);
    this._watchdog = setTimeout(async () => {
      if (!lost()) return;
      if (await this._serverAnswers()) {
        if (lost()) {
          this._mark("disconnected: the server answers, rebuild");
          this._lost("connection lost");
        }
        return;
      }
      this._mark("disconnected: the link to the server is out too");
      console.info("media: disconnected with the link to the server out too: waiting for the link");
      let back = false;
      while (lost() && elapsed() < DISCONNECTED_MAX_MS) {
        await wait(SERVER_RETRY_MS, this._waits);
        if (lost() && await this._serverAnswers()) { back = true; break; }
      }
      if (!lost()) return;
      if (back) {
        const left = Math.max(0, Math.min(RECOVER_GRACE_MS, DISCONNECTED_MAX_MS - elapsed()));
        console.info(`media: the link to the server is back ${Math.round(elapsed())} ms after `
                     + `the connection's loss: ${Math.round(left)} ms for it to recover`);
        await wait(left, this._waits, (done) => {
          const check = () => { if (!lost()) done(); };
          const timer = setInterval(check, 100);
          return () => clearInterval(timer);
        });
      }
      if (lost()) {
        this._mark(`disconnected ${Math.round(elapsed())} ms: rebuild`);
        this._lost("connection lost");
      }
    }, DISCONNECTED_GRACE_MS);
  }

  /** Whether the page's link to the server works now: the socket connected and a
   * `GET /healthz` answered within `SERVER_ANSWER_MS` (the media path is another matter). */
  async _serverAnswers() {
    if (!this.signaling.connected) return false;
    try {
      const answer = await fetch("/healthz", { cache: "no-store",
                                               signal: AbortSignal.timeout(SERVER_ANSWER_MS) });
      await answer.text();
      return answer.ok && this.signaling.connected;
    } catch {
      return false;
    }
  }

  _problem(problem) {
    if (problem !== this.problem) {
      this.problem = problem;
      if (this.handlers.onProblem) this.handlers.onProblem(problem);
    }
  }

  _allConnected() {
    return [this.publishPc, this.screenPc, this.subscribePc]
      .filter(Boolean).every((pc) => pc.connectionState === "connected");
  }

  async _subscribe() {
    const pc = this._newPc();
    this.subscribePc = pc;
    this._watch(pc);
    this._listeners.add(pc, "track", (event) => {
      this._mark(`track ${event.track.kind}`);
      const mid = event.transceiver.mid;
      const publication = this.tracks[mid];
      if (publication) this.handlers.onTrack({ publication, track: event.track, mid });
    });
    // Candidates gathered before the answer went out are in its SDP; trickle only later ones.
    this._listeners.add(pc, "icecandidate", (event) => {
      if (event.candidate && pc.answerSent && this.subscribeId) {
        this.signaling.ice(this.consultationId, this.subscribeId, event.candidate.toJSON()).catch(() => {});
      }
    });
    const offer = await this.signaling.subscribe(this.consultationId);
    this._mark("subscribe offer");
    await this._answer(offer);
    this._mark("subscribe answered");
  }

  async _answer(offer) {
    const pc = this.subscribePc;
    if (!pc || pc.signalingState === "closed") return;
    this.subscribeId = offer.transport_id;
    // Each offer lists every track the relay sends now; a mid missing from it has ended.
    const current = offer.tracks || {};
    for (const [mid, publication] of Object.entries(this.tracks)) {
      if (!current[mid]) this.handlers.onTrackGone(publication.id);
    }
    this.tracks = { ...current };
    await pc.setRemoteDescription({ type: "offer", sdp: offer.sdp });
    // A "track" event fires only for new m-lines: announce the others that carry a track.
    for (const transceiver of pc.getTransceivers()) {
      const publication = current[transceiver.mid];
      if (publication && transceiver.receiver.track) {
        this.handlers.onTrack({ publication, track: transceiver.receiver.track, mid: transceiver.mid });
      }
    }
    await pc.setLocalDescription(await pc.createAnswer());
    await gathered(pc, this._waits);
    await this.signaling.answer(this.consultationId, offer.transport_id, pc.localDescription.sdp);
    pc.answerSent = true;
  }

  async _publishCamera() {
    const tracks = {};
    const audio = this.stream.getAudioTracks()[0];
    const video = this.stream.getVideoTracks()[0];
    if (audio) tracks.audio = "microphone";
    if (video) tracks.video = "camera";
    this.publishPc = await this._publish(this.stream, tracks);
    if (this.muted) await this.setMuted(true);
    if (this.cameraOff) await this.setCameraOff(true);
  }

  /** One publish connection: the client offers, the relay answers. */
  async _publish(stream, kinds) {
    const pc = this._newPc();
    this._watch(pc);
    const sourceOf = new Map();
    for (const track of stream.getTracks()) {
      if (!kinds[track.kind]) continue;
      const transceiver = addSender(pc, track, stream, kinds[track.kind]);
      sourceOf.set(transceiver, kinds[track.kind]);
    }
    let transportId = null;
    // Candidates gathered before the offer went out are in its SDP; trickle only later ones.
    this._listeners.add(pc, "icecandidate", (event) => {
      if (event.candidate && transportId) {
        this.signaling.ice(this.consultationId, transportId, event.candidate.toJSON()).catch(() => {});
      }
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, this._waits);
    this._mark(`publish gathered ${Object.values(kinds).join("+")}`);
    const sources = {};
    for (const [transceiver, source] of sourceOf) sources[transceiver.mid] = source;
    const answer = await this.signaling.publish(this.consultationId, pc.localDescription.sdp, sources);
    transportId = answer.transport_id;
    this._mark(`publish answered ${Object.values(kinds).join("+")}`);
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    pc.transportId = transportId;
    return pc;
  }

  /** Mute: stop sending audio altogether (the sender sends nothing without a track). */
  async setMuted(muted) {
    this.muted = muted;
    await this._toggle("audio", !muted);
  }

  async setCameraOff(off) {
    this.cameraOff = off;
    await this._toggle("video", !off);
  }

  async _toggle(kind, on) {
    if (!this.publishPc || !this.stream) return;
    const track = kind === "audio" ? this.stream.getAudioTracks()[0] : this.stream.getVideoTracks()[0];
    const transceiver = this.publishPc.getTransceivers().find((t) => t.receiver.track.kind === kind);
    if (transceiver) await transceiver.sender.replaceTrack(on ? track : null);
  }

  /** Switch camera or microphone to another device. */
  async useDevice(kind, deviceId) {
    const constraints = kind === "audio" ? { audio: { deviceId: { exact: deviceId } } }
                                         : { video: { deviceId: { exact: deviceId } } };
    const fresh = await navigator.mediaDevices.getUserMedia(constraints);
    const track = fresh.getTracks()[0];
    const old = kind === "audio" ? this.stream.getAudioTracks()[0] : this.stream.getVideoTracks()[0];
    if (old) { this.stream.removeTrack(old); old.stop(); }
    this.stream.addTrack(track);
    const on = kind === "audio" ? !this.muted : !this.cameraOff;
    const transceiver = this.publishPc &&
      this.publishPc.getTransceivers().find((t) => t.receiver.track.kind === kind);
    if (transceiver && on) await transceiver.sender.replaceTrack(track);
    return this.stream;
  }

  async shareScreen() {
    this.screen = await navigator.mediaDevices.getDisplayMedia({ video: true, audio: false });
    this._listeners.add(this.screen.getVideoTracks()[0], "ended", () => this.stopScreen());
    this.screenPc = await this._publish(this.screen, { video: "screen" });
    return this.screen;
  }

  async stopScreen() {
    if (!this.screen) return;
    for (const track of this.screen.getTracks()) {
      this._listeners.removeFrom(track);
      track.stop();
    }
    this.screen = null;
    if (this.screenPc) {
      this._listeners.removeFrom(this.screenPc);
      this.screenPc.close();
      this.screenPc = null;
      await this.signaling.unpublish(this.consultationId, "screen").catch(() => {});
    }
  }

  async setAudioOnly(audioOnly) {
    this.audioOnly = audioOnly;
    await this.signaling.mode(this.consultationId, audioOnly);
  }

  _closePcs() {
    clearTimeout(this._connectDeadline);
    clearTimeout(this._watchdog);
    this._watchId += 1;
    for (const pc of [this.publishPc, this.screenPc, this.subscribePc]) {
      if (!pc) continue;
      this._listeners.removeFrom(pc);
      pc.close();
    }
    this.publishPc = this.screenPc = this.subscribePc = null;
    for (const publication of Object.values(this.tracks)) this.handlers.onTrackGone(publication.id);
    this.tracks = {};
  }

  async _collectStats() {
    const inbound = {};
    let bytes = 0;
    let lost = 0;
    let received = 0;
    let rtt = null;
    let path = null;   // how the subscribe connection reaches the relay: "direct" or "relay" (TURN)
    if (this.subscribePc) {
      const report = await this.subscribePc.getStats();
      report.forEach((s) => {
        if (s.type === "inbound-rtp") {
          const publication = this.tracks[s.mid] || {};
          inbound[s.mid] = {
            kind: s.kind, source: publication.source, participant: publication.participant_id,
            framesDecoded: s.framesDecoded || 0, bytesReceived: s.bytesReceived || 0,
            audioLevel: s.audioLevel || 0, packetsLost: s.packetsLost || 0,
          };
          bytes += s.bytesReceived || 0;
          lost += Math.max(0, s.packetsLost || 0);
          received += s.packetsReceived || 0;
        }
        if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
          rtt = s.currentRoundTripTime * 1000;
        }
        if (s.type === "transport" && s.selectedCandidatePairId) {
          const pair = report.get(s.selectedCandidatePairId);
          const local = pair && report.get(pair.localCandidateId);
          if (local) path = local.candidateType === "relay" ? "relay" : "direct";
        }
      });
    }
    const outbound = {};
    for (const [name, pc] of [["camera", this.publishPc], ["screen", this.screenPc]]) {
      if (!pc) continue;
      const report = await pc.getStats();
      report.forEach((s) => {
        if (s.type === "outbound-rtp") outbound[`${name}:${s.kind}`] = { bytesSent: s.bytesSent || 0, framesSent: s.framesSent || 0 };
      });
    }
    const now = performance.now();
    const kbps = this._lastBytes ? ((bytes - this._lastBytes.bytes) * 8) / (now - this._lastBytes.at) : 0;
    this._lastBytes = { bytes, at: now };
    const lossPct = received + lost > 0 ? (100 * lost) / (received + lost) : 0;
    const quality = lossPct > 5 || (rtt !== null && rtt > 600) ? "poor"
      : lossPct > 1 || (rtt !== null && rtt > 300) ? "fair" : "good";
    this.stats = { inbound, outbound, rttMs: rtt, lossPct, bitrateKbps: Math.max(0, kbps), quality, state: this.state, path };
  }

  /** Stop the media and remove every listener and timer the session registered. */
  close() {
    this.closed = true;
    this._request = null;
    if (this._firstAttempt) { this._firstAttempt(); this._firstAttempt = null; }
    clearInterval(this._statsTimer);
    clearTimeout(this._watchdog);
    for (const end of [...this._waits]) end();
    this._closePcs();
    this._listeners.removeAll();
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.screen) for (const track of this.screen.getTracks()) track.stop();
  }
}
