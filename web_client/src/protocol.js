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

/** A signed-in signaling session. Events are delivered to handlers registered with `on`. */
export class Signaling {
  /** @param {string} token */
  constructor(token) {
    this.token = token;
    this.socket = io({ auth: { token }, transports: ["websocket"], reconnectionDelayMax: 3000 });
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
  async call(event, payload = {}, timeoutMs = 15000) {
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
