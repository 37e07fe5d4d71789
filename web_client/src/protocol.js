// The one module that speaks docs/protocol.md. Everything else in the client is UI.
import { io } from "/vendor/socket.io.esm.min.js";

/**
 * @typedef {{id: string, name: string, tier: "central"|"provincial"|"district"|"commune", region: string}} Site
 * @typedef {{id: string, site_id: string, requester_id: string, specialty: string,
 *   priority: "routine"|"urgent"|"asap"|"stat", reason: string, patient_pseudonym: ?string,
 *   status: "waiting"|"accepted"|"closed"|"cancelled"|"expired", created_at: number,
 *   escalated: boolean, accepted_by: ?string, consultation_id: ?string, position?: ?number}} ConsultRequest
 * @typedef {{conclusion: string, signed_by: string, signed_at: number}} Minutes
 * @typedef {{id: string, request_id: string, host_id: string, relay_id: string,
 *   state: "open"|"live"|"ended", created_at: number, started_at: ?number, ended_at: ?number,
 *   site_ids: string[], clinician_ids: string[], invited_site_ids: string[], minutes: ?Minutes}} Consultation
 * @typedef {{clinician_id: string, site_id: string, joined_at: number, state: "present"|"reconnecting"}} Participant
 * @typedef {{id: string, consultation_id: string, sender_id: string, site_id: string, text: string, sent_at: number}} ChatMessage
 * @typedef {{id: string, participant_id: string, source: "microphone"|"camera"|"screen", kind: "audio"|"video", codec: string}} Publication
 * @typedef {{transport_id: string, type: "offer"|"answer", sdp: string, tracks?: Object<string, Publication>, publications?: Publication[]}} MediaDescription
 * @typedef {{consultation_id: string, status: "off"|"pending"|"on"|"declined"|"stopped"|"failed"|"disabled",
 *   policy: "always"|"with_consent"|"never"|null, consent: {clinician_id: string, answer: "pending"|"agreed"|"declined"}[],
 *   since: number|null, error: string|null}} RecordingState
 * @typedef {{code: string, message: string}} ProtocolError
 */

export class ProtocolRefusal extends Error {
  /** @param {string} event @param {ProtocolError} error */
  constructor(event, error) {
    super(error.message);
    this.event = event;
    this.code = error.code;
  }
}

/** The connect refusal that is tried again (after 2-4 s) instead of ending the session. */
const TRY_AGAIN = "limits_unavailable";
const TRY_AGAIN_MS = 2000;

// A long link (issue #15): an island's satellite link has a ~700 ms round trip and outages of
// 5-10 s. The numbers below fit it; docs/protocol.md ("A long link") says the same.
/** A request's answer may take this long. A request sent as an outage starts waits for the
 * outage (10 s), then for TCP's retransmission, whose timer doubles while nothing is
 * acknowledged (after ~1, 3, 7, 15 s on a 700 ms round trip), then a round trip: ~16 s. */
export const CALL_TIMEOUT_MS = 20_000;
/** socket.io's reconnection: first attempt after 1 s, then doubling up to 3 s (each +-50 %,
 * so that the clients of a restarted server spread out): during an outage the page tries
 * again every few seconds, and is back within ~3 s of the link's return. */
const RECONNECT_DELAY_MS = 1000;
const RECONNECT_DELAY_MAX_MS = 3000;
/** One connection attempt (TCP, TLS, the websocket upgrade, socket.io's connect: ~5 round
 * trips, 3.5 s at 700 ms, plus a lost SYN sent again after 1 s and 3 s) is given up after
 * this, so that an attempt caught in an outage does not hold the next one back (socket.io's
 * default is 20 s). */
const CONNECT_TIMEOUT_MS = 10_000;

/** The link watch (below) asks `GET /healthz` this often while the page runs. */
export const LINK_PROBE_EVERY_MS = 2000;
/** A probe not answered within this is a weak link (shown at once, not at the probe's end):
 * three round trips of the network's longest link (a satellite hop, ~700 ms: a fresh
 * connection's TCP and TLS handshakes and the request) and a margin, so a satellite site is
 * not "weak" for its distance alone, only when requests start to wait (a queue building up,
 * retransmissions, an outage). */
export const LINK_SLOW_MS = 2500;
/** A probe still unanswered is abandoned after this (its connection too); the next starts. */
const LINK_PROBE_ABORT_MS = 8000;
/** Probes answered in time in a row before the link is said to be good again: a link that
 * comes back for one request and goes again does not make the banner blink. */
const LINK_GOOD_PROBES = 2;

/** A signed-in signaling session. Events are delivered to handlers registered with `on`. */
export class Signaling {
  /** @param {string} token */
  constructor(token) {
    this.token = token;
    this.socket = io({ auth: { token }, transports: ["websocket"],
                       reconnectionDelay: RECONNECT_DELAY_MS,
                       reconnectionDelayMax: RECONNECT_DELAY_MAX_MS, timeout: CONNECT_TIMEOUT_MS });
    // A refusal with a code ends socket.io's own reconnection; `limits_unavailable` (the
    // fleet's Redis does not answer for a moment) is worth trying again by ourselves.
    this.socket.on("connect_error", (error) => {
      const data = error && error.data;
      if (data && data.code === TRY_AGAIN && this.socket.disconnected) {
        console.warn(`signaling: ${data.code}; connecting again`);
        setTimeout(() => { if (this.socket.disconnected) this.socket.connect(); },
                   TRY_AGAIN_MS + Math.random() * TRY_AGAIN_MS);
      }
    });
  }

  /** Resolves once connected; rejects with the server's refusal (`code`: token_expired...). */
  ready() {
    return new Promise((resolve, reject) => {
      if (this.socket.connected) return resolve(undefined);
      const ok = () => { this.socket.off("connect_error", bad); resolve(undefined); };
      const bad = (error) => {
        const data = error && error.data;
        if (data && data.code && data.code !== TRY_AGAIN) {
          this.socket.off("connect", ok);
          this.socket.disconnect();
          reject(new ProtocolRefusal("connect", data));
        }
      };
      this.socket.once("connect", ok);
      this.socket.on("connect_error", bad);
    });
  }

  /** Whether the socket is connected now (socket.io reconnects it by itself). */
  get connected() { return this.socket.connected; }

  /** @param {string} event @param {(data: any) => void} handler */
  on(event, handler) { this.socket.on(event, handler); }

  /** Remove a handler registered with `on`. @param {string} event @param {(data: any) => void} handler */
  off(event, handler) { this.socket.off(event, handler); }

  /** Emit with an ack; resolves the result, rejects with ProtocolRefusal. */
  async call(event, payload = {}, timeoutMs = CALL_TIMEOUT_MS) {
    const answer = await this.socket.timeout(timeoutMs).emitWithAck(event, payload);
    if (answer && answer.error) throw new ProtocolRefusal(event, answer.error);
    return answer;
  }

  // -- queue and pairing --------------------------------------------------------------
  /** @returns {Promise<{request: ConsultRequest, position: number}>} */
  request(specialty, priority, reason, patientPseudonym) {
    const payload = { specialty, priority, reason };
    if (patientPseudonym) payload.patient_pseudonym = patientPseudonym;
    return this.call("consult:request", payload);
  }
  cancel(requestId) { return this.call("consult:cancel", { request_id: requestId }); }
  /** @returns {Promise<{consultation: Consultation, request: ConsultRequest}>} */
  accept(requestId) { return this.call("consult:accept", { request_id: requestId }); }
  /** @returns {Promise<{queue: ConsultRequest[], mine: ConsultRequest[]}>} */
  queue() { return this.call("queue:get", {}); }
  presence() { return this.call("presence:list", {}); }

  // -- consultation -------------------------------------------------------------------
  /** @returns {Promise<{consultation: Consultation, participants: Participant[], chat: ChatMessage[], recording: RecordingState}>} */
  join(consultationId) { return this.call("consult:join", { consultation_id: consultationId }); }
  leave(consultationId) { return this.call("consult:leave", { consultation_id: consultationId }); }
  invite(consultationId, siteId) {
    return this.call("consult:invite", { consultation_id: consultationId, site_id: siteId });
  }
  chat(consultationId, text) { return this.call("chat:send", { consultation_id: consultationId, text }); }
  end(consultationId, conclusion) {
    return this.call("consult:end", { consultation_id: consultationId, conclusion });
  }

  // -- media ----------------------------------------------------------------------------
  /** `media:join`; with `resume` the relay keeps this participant's media if it still carries
   * it (the ack says `resumed`), else the media starts afresh.
   * @returns {Promise<{resumed?: boolean, relay: object, ice_servers: RTCIceServer[],
   *   ice_transport_policy: "all"|"relay", turn_expires_at: ?number}>} */
  mediaJoin(consultationId, resume = false) {
    const payload = { consultation_id: consultationId };
    if (resume) payload.resume = true;
    return this.call("media:join", payload);
  }
  /** @returns {Promise<MediaDescription>} */
  publish(consultationId, sdp, sources) {
    return this.call("media:publish", { consultation_id: consultationId, sdp, sources });
  }
  unpublish(consultationId, source) {
    return this.call("media:unpublish", { consultation_id: consultationId, source });
  }
  /** @returns {Promise<MediaDescription>} */
  subscribe(consultationId) { return this.call("media:subscribe", { consultation_id: consultationId }); }
  answer(consultationId, transportId, sdp) {
    return this.call("media:answer", { consultation_id: consultationId, transport_id: transportId, sdp });
  }
  ice(consultationId, transportId, candidate) {
    return this.call("media:ice", { consultation_id: consultationId, transport_id: transportId, candidate });
  }
  mode(consultationId, audioOnly) {
    return this.call("media:mode", { consultation_id: consultationId, audio_only: audioOnly });
  }
  /** The ICE servers (TURN credentials included) and policy, before joining (the pre-call check).
   * @returns {Promise<{ice_servers: RTCIceServer[], ice_transport_policy: "all"|"relay", turn_expires_at: ?number}>} */
  iceServers(consultationId) { return this.call("media:ice_servers", { consultation_id: consultationId }); }
  /** The pre-call check's network probe: a data-channel-only offer, answered by the relay.
   * @returns {Promise<{type: "answer", sdp: string}>} */
  probe(consultationId, sdp) {
    return this.call("media:probe", { consultation_id: consultationId, type: "offer", sdp }, 10_000);
  }

  // -- recording --------------------------------------------------------------------------
  /** @returns {Promise<{recording: RecordingState}>} */
  recordingConsent(consultationId, agree) {
    return this.call("recording:consent", { consultation_id: consultationId, agree });
  }
  /** @returns {Promise<{recording: RecordingState}>} */
  recordingStart(consultationId) { return this.call("recording:start", { consultation_id: consultationId }); }
  /** @returns {Promise<{recording: RecordingState}>} */
  recordingStop(consultationId) { return this.call("recording:stop", { consultation_id: consultationId }); }

  /** A consultation's recordings (participants and admins; every access is audited). */
  recordings(consultationId) { return this.http(`/api/consultations/${encodeURIComponent(consultationId)}/recordings`); }

  /** Download one recording (the URL from `recordings`) as a Blob. */
  async download(path) {
    const response = await fetch(path, { headers: { Authorization: `Bearer ${this.token}` } });
    if (!response.ok) throw new ProtocolRefusal(path, (await response.json()).error);
    return response.blob();
  }

  /** HTTP API with the same token. */
  async http(path) {
    const response = await fetch(path, { headers: { Authorization: `Bearer ${this.token}` } });
    const body = await response.json();
    if (!response.ok) throw new ProtocolRefusal(path, body.error);
    return body;
  }

  /** HTTP API call with a JSON body (POST, PATCH, PUT), with the same token. */
  async send(method, path, payload) {
    const init = { method, headers: { Authorization: `Bearer ${this.token}` } };
    if (payload !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(payload);
    }
    const response = await fetch(path, init);
    let body = {};
    try { body = await response.json(); } catch { /* no JSON body */ }
    if (!response.ok) {
      throw new ProtocolRefusal(path, body.error || { code: "internal", message: `HTTP ${response.status}` });
    }
    return body;
  }

  /** A renewed access token of the same clinician: the HTTP calls use it from now on, a
   * reconnect presents it, and the open connection is told (`auth:refresh`), so that the
   * server closes it at the new token's expiry instead of the old one's.
   * @returns {Promise<{expires_at: number}>} */
  renew(token) {
    this.token = token;
    this.socket.auth = { token };
    return this.call("auth:refresh", { token });
  }

  close() { this.socket.disconnect(); }
}

/**
 * Whether the page's link to the server is weak now: the socket is away (socket.io
 * reconnecting), or a request waits longer than `LINK_SLOW_MS`. A `GET /healthz` every
 * `LINK_PROBE_EVERY_MS` measures it: the same network path as the socket (a new TCP
 * connection, or a kept-alive one, to the same server), a few hundred bytes each way; the
 * socket itself says nothing of a stall until socket.io's ping timeout (30 s), far too late
 * for a doctor who wonders why the chat does not go. `onChange(weak)` is called on each
 * change; it clears by itself once the probes are answered in time again.
 */
export class LinkWatch {
  /** @param {Signaling} signaling @param {(weak: boolean) => void} onChange */
  constructor(signaling, onChange) {
    this.signaling = signaling;
    this.onChange = onChange;
    this.weak = false;
    /** The last probe's round trip (ms), null before one was answered. */
    this.rttMs = null;
    /** Probes sent, and those late or failed: for the tests and the console. */
    this.probes = 0;
    this.late = 0;
    this._good = LINK_GOOD_PROBES;
    this._inflight = null;
    this._lastAt = -Infinity;
    this._update = () => this._check();
    signaling.socket.on("connect", this._update);
    signaling.socket.on("disconnect", this._update);
    this._timer = setInterval(() => this._tick(), 250);
  }

  _tick() {
    const now = performance.now();
    if (this._inflight !== null && now - this._inflight > LINK_SLOW_MS) this._good = 0;
    if (this._inflight === null && now - this._lastAt >= LINK_PROBE_EVERY_MS) this._probe(now);
    this._check();
  }

  async _probe(started) {
    this._inflight = started;
    this._lastAt = started;
    this.probes += 1;
    let inTime = false;
    try {
      const answer = await fetch("/healthz", { cache: "no-store",
                                               signal: AbortSignal.timeout(LINK_PROBE_ABORT_MS) });
      await answer.text();
      const rtt = performance.now() - started;
      if (answer.ok) this.rttMs = rtt;
      inTime = answer.ok && rtt <= LINK_SLOW_MS;
    } catch {
      // No answer at all (an outage, the server restarting): weak, the next probe tells more.
    }
    if (this._timer === null) return;
    this._inflight = null;
    if (inTime) this._good = Math.min(this._good + 1, LINK_GOOD_PROBES);
    else { this._good = 0; this.late += 1; }
    this._check();
  }

  _check() {
    const weak = !this.signaling.connected || this._good < LINK_GOOD_PROBES;
    if (weak === this.weak) return;
    this.weak = weak;
    console.info(`link: ${weak ? "weak" : "good again"} (round trip ${this.rttMs === null ? "-" : Math.round(this.rttMs)} ms, `
                 + `${this.signaling.connected ? "connected" : "socket away"})`);
    this.onChange(weak);
  }

  stop() {
    clearInterval(this._timer);
    this._timer = null;
    this.signaling.socket.off("connect", this._update);
    this.signaling.socket.off("disconnect", this._update);
  }
}
