// The pre-call check's network line: can this browser reach the consultation's relay, directly
// or only through TURN? A throwaway peer connection with one data channel and no media is
// offered to the relay (`media:probe`, docs/protocol.md); once it connects, the selected
// candidate pair's local candidate tells the path: `relay` went through TURN, `host`, `srflx` or
// `prflx` reached the relay directly. Nothing connected within the deadline: no path at all.

import { gathered } from "./media.js";
import { ProtocolRefusal } from "./protocol.js";
import { icePolicy } from "./settings.js";

/** How long the connection may take after the relay answered (ICE checks, through TURN too). */
const CONNECT_DEADLINE_MS = 8000;

/**
 * @typedef {"direct"|"relay"|"none"|"waiting"|"unchecked"} NetworkPath
 *   unchecked: the server does not offer the probe, or the check was stopped (the doctor went in).
 */

export class NetworkProbe {
  /** @param {import("./protocol.js").Signaling} signaling @param {string} consultationId */
  constructor(signaling, consultationId) {
    this.signaling = signaling;
    this.consultationId = consultationId;
    this.pc = null;
    /** What the probe found: the path and the local candidate type it saw. */
    this.result = null;
    this._finish = null;
    this._waits = new Set();
    this._removers = [];
    this._started = performance.now();
  }

  /** Run once. @returns {Promise<{path: NetworkPath, candidateType?: string, policy?: string,
   *   ms: number}>} ms: how long the check took. */
  run() {
    if (!this._running) {
      this._running = new Promise((resolve) => { this._finish = resolve; });
      this._probe().then((found) => this._end(found), (error) => {
        console.warn("network probe:", error && error.name, error && error.message);
        const code = error instanceof ProtocolRefusal ? error.code : null;
        // relay_waiting: no relay carries the consultation at the moment (docs/failover.md).
        this._end({ path: code === "relay_unreachable" ? "none"
          : code === "relay_waiting" ? "waiting" : "unchecked" });
      });
    }
    return this._running;
  }

  /** Stop now (the doctor entered the room): the connection and its listeners go at once. */
  abort() { this._end({ path: "unchecked" }); }

  _end(found) {
    if (this.result) return;
    this.result = { ...found, ms: Math.round(performance.now() - this._started) };
    for (const end of [...this._waits]) end();
    for (const remove of this._removers) remove();
    this._removers = [];
    if (this.pc) this.pc.close();
    this.pc = null;
    if (this._finish) this._finish(this.result);
  }

  _listen(target, type, handler) {
    target.addEventListener(type, handler);
    this._removers.push(() => target.removeEventListener(type, handler));
  }

  async _probe() {
    const config = await this._iceConfig();
    if (this.result) return this.result;
    const policy = icePolicy(config.ice_transport_policy);
    const pc = new RTCPeerConnection({ iceServers: config.ice_servers || [], iceTransportPolicy: policy });
    this.pc = pc;
    pc.createDataChannel("probe");
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, this._waits);
    if (this.result) return this.result;
    // Not one candidate (relay-only, and the TURN server unreachable or refusing): nothing
    // could reach the relay, no need to ask it.
    if (!/^a=candidate:/m.test(pc.localDescription.sdp)) return { path: "none", policy };
    const answer = await this.signaling.probe(this.consultationId, pc.localDescription.sdp);
    if (this.result) return this.result;
    const connected = new Promise((resolve) => {
      const timer = setTimeout(() => done(false), CONNECT_DEADLINE_MS);
      const check = () => {
        if (pc.connectionState === "connected") done(true);
        if (pc.connectionState === "failed" || pc.connectionState === "closed") done(false);
      };
      const done = (ok) => { clearTimeout(timer); this._waits.delete(end); resolve(ok); };
      const end = () => done(false);
      this._waits.add(end);
      this._listen(pc, "connectionstatechange", check);
    });
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    if (!(await connected) || this.result) return this.result || { path: "none", policy };
    const candidateType = await selectedLocalCandidateType(pc);
    return { path: candidateType === "relay" ? "relay" : "direct", candidateType, policy };
  }

  /** The ICE servers and policy the probe uses: the same the room will use (TURN credentials
   * included), from `media:ice_servers`. */
  async _iceConfig() {
    return this.signaling.iceServers(this.consultationId);
  }
}

/** The local candidate type (host, srflx, prflx, relay) of the pair ICE selected. */
async function selectedLocalCandidateType(pc) {
  const report = await pc.getStats();
  let pair = null;
  report.forEach((s) => {
    if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
  });
  if (!pair) report.forEach((s) => { if (s.type === "candidate-pair" && s.nominated && s.state === "succeeded") pair = s; });
  const local = pair && report.get(pair.localCandidateId);
  return local ? local.candidateType : "unknown";
}
