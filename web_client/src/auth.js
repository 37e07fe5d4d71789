// A password (or single sign-on) session, as docs/protocol.md "Accounts" describes it: the
// access token lives in this module's memory only (never localStorage or sessionStorage, where
// any script of the origin could read it); the HttpOnly refresh cookie, which no script can
// read, brings it back when the tab is reopened and renews it before it expires, so that a
// doctor on a 12-hour shift is never logged off mid-consultation while a stolen access token
// is good for minutes only.

// When the doctor last touched the page (a click, a tap, a key), for the idle log-off below.
let lastActivity = Date.now();
for (const type of ["pointerdown", "keydown"]) {
  addEventListener(type, () => { lastActivity = Date.now(); }, { passive: true, capture: true });
}

/** The server refused (an HTTP 4xx JSON body): `code`, its words in `message`, and the
 * extra fields some codes carry (`retry_after_s`, `secret`, `provisioning_uri`). */
export class AuthRefusal extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (error && error.code) || "internal";
    this.details = error || {};
  }
}

async function post(path, body) {
  const init = { method: "POST", credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer = {};
  try { answer = await response.json(); } catch { /* an empty or non-JSON body */ }
  if (!response.ok) throw new AuthRefusal(response.status, answer.error);
  return answer;
}

/** Set a password from an activation code (`totp` and `enableTotp` for the second factor). */
export function activate(code, password, { totp, enableTotp } = {}) {
  const body = { code, password };
  if (totp) body.totp = totp;
  if (enableTotp) body.enable_totp = true;
  return post("/api/auth/activate", body);
}

/**
 * The signed-in session. `onToken(token)` is called with every renewed access token (the
 * page hands it to the open socket with `auth:refresh`); `onEnded(code)` when the server
 * refuses to renew (`session_ended`: signed out elsewhere, revoked, past the shift, idle).
 */
export class Session {
  constructor() {
    this.token = null;
    this.expiresAt = 0;
    this.timer = null;
    this.onToken = () => {};
    this.onEnded = () => {};
    this.refreshes = 0;
    // Idle log-off: the page renews the token only while the doctor did something within the
    // idle time (the server's `idle_timeout_s` when it says it, else its default 30 min), or
    // is in a consultation (listening is not idle). Otherwise the token runs out and the
    // server closes the connection: the doctor signs in again.
    this.idleMs = 30 * 60 * 1000;
    this.inRoom = false;
  }

  async signIn(clinicianId, password, totp) {
    const body = { clinician_id: clinicianId, password };
    if (totp) body.totp = totp;
    this.accept(await post("/api/auth/signin", body));
  }

  /** Renew the access token with the refresh cookie (also: the first thing a page tries).
   * Tabs of one browser share the cookie, which is used up by each renewal: the Web Locks
   * API lets one tab renew at a time, so that two never present the same cookie (which the
   * server takes for a stolen copy and revokes the session). Every renewed token goes to
   * `onToken` at once, whoever asked for it: the open socket must never keep a token older
   * than the one the timer is counting from. */
  async refresh() {
    const run = async () => this.accept(await post("/api/auth/refresh"));
    if (navigator.locks) await navigator.locks.request("telehealth-refresh", run);
    else await run();
    this.refreshes += 1;
    this.onToken(this.token);
  }

  accept(answer) {
    this.token = answer.access_token;
    this.expiresAt = answer.expires_at;
    if (answer.idle_timeout_s) this.idleMs = answer.idle_timeout_s * 1000;
    this.schedule();
  }

  /** Renew at 70 % of what is left (at least 1 s ahead); retry a failed network call. */
  schedule(delayMs) {
    clearTimeout(this.timer);
    const left = this.expiresAt * 1000 - Date.now();
    const wait = delayMs !== undefined ? delayMs : Math.max(1000, left * 0.7);
    this.timer = setTimeout(() => this.renew(), wait);
  }

  async renew() {
    if (!this.token) return;
    if (Date.now() - lastActivity > this.idleMs && !this.inRoom) {
      // Idle: look again shortly before the token runs out, then let it go.
      const left = this.expiresAt * 1000 - Date.now();
      if (left > 1500) this.schedule(Math.min(5000, left - 1000));
      return;
    }
    try {
      await this.refresh();
    } catch (error) {
      if (error instanceof AuthRefusal && error.status < 500) {
        this.stop();
        this.onEnded(error.code);
      } else if (Date.now() < this.expiresAt * 1000) {
        console.warn("auth: refresh failed, retrying:", error && error.message);
        this.schedule(3000);
      }
    }
  }

  /** Revoke the session on the server (the cookie is deleted) and forget the token. */
  async signOut() {
    this.stop();
    await post("/api/auth/signout").catch((error) => console.warn("auth: sign-out:", error.message));
  }

  stop() {
    clearTimeout(this.timer);
    this.token = null;
    this.expiresAt = 0;
  }
}

/** Whether the server offers single sign-on (docs/protocol.md, OpenID Connect). */
export async function oidcStart() {
  try {
    const response = await fetch("/api/auth/oidc/config");
    if (!response.ok) return null;
    const config = await response.json();
    return config.enabled ? config.start : null;
  } catch { return null; }
}
