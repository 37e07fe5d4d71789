// The user interface. It speaks to the server only through protocol.js and media.js.
import { Signaling, ProtocolRefusal, LinkWatch } from "./protocol.js";
import { MediaSession } from "./media.js";
import { NetworkProbe } from "./netprobe.js";
import { EXPLANATION, deviceProblem, openDevices, originProblem } from "./problems.js";
import { forceRelay, setForceRelay } from "./settings.js";
import { testHooks } from "./testhooks.js";
import { Session, AuthRefusal, activate, oidcStart } from "./auth.js";
import { renderAdmin } from "./admin.js";
import { h, flash } from "./dom.js";
import { t, tf, duration, getLanguage, setLanguage, specialtyName } from "./i18n.js";

const root = document.getElementById("app");
const state = {
  signaling: null, me: null, sites: {}, queue: [], mine: [], consultations: [],
  room: null, view: "dashboard", probe: null,
  session: null, // the password (or single sign-on) session: null for a `#token=` link
  link: null,    // the LinkWatch of the signed-in page: the "Kết nối yếu" banner
};

/** An error whose message is already written for the doctor, in the interface language. */
class Explained extends Error {}

function describeError(error) {
  if (error instanceof Explained) return error.message;
  if (error instanceof ProtocolRefusal) {
    if (error.code === "token_expired") return t("tokenExpired");
    if (error.code === "already_taken") return t("alreadyTaken");
    if (error.code === "media_ports_exhausted") return t("relayFull");
    if (error.code === "relay_unreachable") return t("relayUnreachable");
    if (error.code === "limits_unavailable") return t("limitsUnavailable");
    return error.message;
  }
  // A browser's own error text means nothing to a doctor: it goes to the console, the page
  // says what to do.
  console.warn("error:", error && error.name, error && error.message);
  if (typeof DOMException !== "undefined" && error instanceof DOMException) {
    return t(EXPLANATION[deviceProblem(error)]);
  }
  return t("unexpectedError");
}

function roleName(role) {
  return t({ referring: "roleReferring", specialist: "roleSpecialist",
             coordinator: "roleCoordinator", admin: "roleAdmin", site_admin: "roleSiteAdmin" }[role] || role);
}

function siteName(id) { return (state.sites[id] && state.sites[id].name) || id; }

function minutesAgo(seconds) {
  const m = Math.max(0, Math.round((Date.now() / 1000 - seconds) / 60));
  return getLanguage() === "vi" ? `${m} phút` : `${m} min`;
}

// -- sign in ------------------------------------------------------------------------------
// A `#token=` link (`telehealth token`, for tests and demos) signs in with that token alone,
// kept in sessionStorage as before; every other sign-in is a session (auth.js) whose access
// token stays in memory.
function tokenFromLocation() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem("telehealth.token", token);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return token || sessionStorage.getItem("telehealth.token");
}

/** What a refusal of the accounts routes means for the doctor, in the interface language. */
function describeAuth(error) {
  if (!(error instanceof AuthRefusal)) {
    console.warn("auth:", error && error.name, error && error.message);
    return t("networkError");
  }
  switch (error.code) {
    case "invalid_credentials": return t("invalidCredentials");
    case "locked_out": return tf("lockedOut", { wait: duration(error.details.retry_after_s || 30) });
    case "totp_required": return t("totpNeeded");
    case "totp_invalid": return t("totpInvalid");
    case "totp_setup_required": return t("totpSetupMissing");
    case "session_ended": return t("sessionEnded");
    case "activation_invalid": return t("activationInvalid");
    case "weak_password": return `${t("weakPassword")}: ${error.message}`;
    case "invalid_payload": return `${t("invalidInput")}: ${error.message}`;
    case "oidc_unavailable": case "state_mismatch": case "provider_error": case "token_failed":
    case "bad_id_token": case "no_clinician_claim": return t("ssoFailed");
    case "unknown_clinician": return t("ssoUnknown");
    case "accounts_unavailable": return t("accountsUnavailable");
    default: return t("unexpectedError");
  }
}

function renderSignIn(message, { clinicianId = "", password = "", totp = false } = {}) {
  const id = h("input", { id: "signin-id", name: "username", autocomplete: "username", required: true,
                          maxlength: 64, value: clinicianId });
  const pass = h("input", { id: "signin-password", type: "password", name: "password",
                            autocomplete: "current-password", required: true, maxlength: 256 });
  pass.value = password;
  const code = h("input", { id: "signin-totp", inputmode: "numeric", autocomplete: "one-time-code",
                            pattern: "[0-9]{6}", maxlength: 6 });
  const codeLabel = h("label", { id: "signin-totp-label", hidden: !totp }, t("totpCode"), code);
  const error = h("p", { class: "error", id: "sign-in-error", role: "alert", hidden: !message }, message || "");
  const button = h("button", { id: "signin-submit", class: "primary", type: "submit" }, t("signIn"));
  const form = h("form", { id: "signin-form" }, h("label", {}, t("clinicianId"), id),
                 h("label", {}, t("password"), pass), codeLabel, button);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    button.disabled = true;
    const session = new Session();
    try {
      await session.signIn(id.value.trim(), pass.value, codeLabel.hidden ? undefined : code.value.trim());
      await start(session.token, session);
    } catch (refusal) {
      const text = describeAuth(refusal);
      error.textContent = text;
      error.hidden = false;
      error.dataset.code = refusal.code || "network";
      if (refusal.code === "totp_required" || refusal.code === "totp_invalid") {
        codeLabel.hidden = false;
        code.value = "";
        code.focus();
      }
    } finally { button.disabled = false; }
  });
  const tokenInput = h("textarea", { id: "token-input", rows: 3, placeholder: "eyJ…" });
  const sso = h("p", { id: "sso", hidden: true });
  oidcStart().then((startPath) => {
    if (!startPath) return;
    sso.replaceChildren(h("a", { href: startPath, class: "button", id: "sso-link" }, t("ssoSignIn")));
    sso.hidden = false;
  });
  root.replaceChildren(h("section", { class: "card narrow", id: "sign-in" },
    h("h2", {}, t("signIn")), error, form, sso,
    h("details", { class: "token-sign-in" }, h("summary", {}, t("tokenSignIn")),
      h("label", {}, t("tokenLabel"), tokenInput),
      h("button", { id: "sign-in-button", onclick: () => {
        const token = tokenInput.value.trim();
        if (token) { sessionStorage.setItem("telehealth.token", token); start(token); }
      } }, t("signIn")))));
  (clinicianId ? (totp ? code : pass) : id).focus();
}

// -- activation (`#activate=<code>`, from `telehealth account activation` or the admin tab) --
function renderActivation(code) {
  const pass = h("input", { id: "activate-password", type: "password", autocomplete: "new-password",
                            required: true, minlength: 12, maxlength: 256 });
  const again = h("input", { id: "activate-confirm", type: "password", autocomplete: "new-password",
                             required: true, maxlength: 256 });
  const enable = h("input", { id: "activate-enable-totp", type: "checkbox" });
  const totp = h("input", { id: "activate-totp", inputmode: "numeric", autocomplete: "one-time-code",
                            pattern: "[0-9]{6}", maxlength: 6 });
  const setup = h("div", { id: "totp-setup", class: "totp-setup", hidden: true });
  const error = h("p", { class: "error", id: "activate-error", role: "alert", hidden: true });
  const button = h("button", { id: "activate-submit", class: "primary", type: "submit" }, t("activate"));
  const form = h("form", { id: "activate-form" },
    h("p", { class: "policy", id: "password-policy" }, t("passwordPolicy")),
    h("label", {}, t("newPassword"), pass), h("label", {}, t("confirmPassword"), again),
    h("label", { class: "inline" }, enable, " ", t("enableTotp")), setup, button);
  let secretShown = false;
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    if (pass.value !== again.value) {
      error.textContent = t("passwordMismatch");
      error.hidden = false;
      return;
    }
    button.disabled = true;
    try {
      const done = await activate(code, pass.value, { totp: secretShown ? totp.value.trim() : undefined,
                                                      enableTotp: enable.checked });
      history.replaceState(null, "", location.pathname + location.search);
      if (secretShown) {
        // The code just typed is used up (a code is good once): sign in with the next one.
        renderSignIn(t("activatedTotp"), { clinicianId: done.clinician_id, password: pass.value, totp: true });
        document.getElementById("sign-in-error").classList.replace("error", "info");
        return;
      }
      const session = new Session();
      await session.signIn(done.clinician_id, pass.value);
      await start(session.token, session);
    } catch (refusal) {
      if (refusal.code === "totp_setup_required" && refusal.details.secret) {
        secretShown = true;
        setup.replaceChildren(h("p", {}, t("totpSetup")),
          h("p", {}, `${t("secretKey")}: `, h("code", { id: "totp-secret" }, refusal.details.secret)),
          h("p", { class: "muted" }, `${t("otpUri")}: `, h("code", { id: "totp-uri" }, refusal.details.provisioning_uri)),
          h("label", {}, t("totpCode"), totp));
        setup.hidden = false;
        enable.disabled = true;
        totp.focus();
      } else {
        error.textContent = describeAuth(refusal);
        error.dataset.code = refusal.code || "network";
        error.hidden = false;
      }
    } finally { button.disabled = false; }
  });
  root.replaceChildren(h("section", { class: "card narrow", id: "activate" },
    h("h2", {}, t("activateTitle")), error, form));
  pass.focus();
}

async function start(token, session = null) {
  root.replaceChildren(h("p", { class: "muted" }, t("connecting")));
  const signaling = new Signaling(token);
  try {
    await signaling.ready();
    state.me = await signaling.http("/api/me");
  } catch (error) {
    signaling.close();
    if (session) session.stop();
    sessionStorage.removeItem("telehealth.token");
    const code = error && error.code;
    renderSignIn(code === "token_expired" ? t("tokenExpired") : `${t("tokenInvalid")} (${describeError(error)})`);
    return;
  }
  state.signaling = signaling;
  state.session = session;
  state.link = new LinkWatch(signaling, setWeakLink);
  if (testHooks) testHooks.link = state.link;
  if (session) {
    session.onToken = (renewed) => {
      signaling.renew(renewed).catch((e) => console.warn("auth: auth:refresh refused:", e.code, e.message));
    };
    session.onEnded = () => endSession(t("sessionEnded"));
  }
  if (testHooks) testHooks.session = session;
  const sites = await signaling.http("/api/sites");
  for (const site of sites.sites) state.sites[site.id] = site;
  bindEvents(signaling);
  renderHeader();
  await refresh();
}

/** Back to the sign-in page with `message`: the room closed, the socket closed, nothing kept. */
function endSession(message) {
  if (state.room) {
    const room = state.room;
    clearInterval(room.qualityTimer);
    if (room.media) room.media.close();
    if (room.stream) for (const track of room.stream.getTracks()) track.stop();
  }
  if (state.link) state.link.stop();
  setWeakLink(false);
  if (state.signaling) state.signaling.close();
  if (state.session) state.session.stop();
  sessionStorage.removeItem("telehealth.token");
  Object.assign(state, { signaling: null, session: null, link: null, me: null, sites: {}, queue: [], mine: [],
                         consultations: [], room: null, view: "dashboard" });
  document.getElementById("who").replaceChildren();
  renderSignIn(message);
}

async function signOut() {
  const session = state.session;
  if (session) await session.signOut();
  endSession(t("signedOut"));
  const shown = document.getElementById("sign-in-error");
  if (shown) shown.classList.replace("error", "info");
}

function renderHeader() {
  const me = state.me;
  const header = document.getElementById("who");
  header.replaceChildren(
    h("span", { id: "who-name" }, me.clinician.name), " · ",
    h("span", {}, me.site.name), " · ",
    h("span", { class: "muted" }, me.roles.map(roleName).join(", ")),
    " ",
    h("button", { class: "link", id: "sign-out", onclick: signOut }, t("signOut")));
}

// Runs `task` for a burst of calls at most once per `gapMs` and never twice at once: a busy
// queue (many queue:update events) costs one queue:get, within the server's event limits.
function coalesced(task, gapMs = 300) {
  let running = false;
  let again = false;
  let last = 0;
  return async () => {
    if (running) { again = true; return; }
    running = true;
    try {
      do {
        again = false;
        const wait = last + gapMs - Date.now();
        if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait));
        last = Date.now();
        await task();
      } while (again);
    } finally {
      running = false;
    }
  };
}

function bindEvents(signaling) {
  const reload = coalesced(() => refresh().catch((e) => flash(describeError(e))));
  signaling.on("queue:update", (event) => {
    if (event.action === "added" && state.me.roles.includes("specialist")) flash(t("newRequest"), "info");
    reload();
  });
  signaling.on("request:update", (event) => {
    if (event.message) flash(event.message, "info");
    reload();
  });
  signaling.on("queue:escalated", reload);
  signaling.on("consult:ready", (event) => { flash(`${t("accepted")}: ${specialtyName(event.request.specialty)}`, "info"); reload(); });
  signaling.on("consult:invited", () => { flash(t("invited"), "info"); reload(); });
  signaling.on("consult:ended", (event) => {
    if (state.room && state.room.id === event.consultation.id) closeRoom(event.consultation);
    reload();
  });
  signaling.on("presence:update", (event) => {
    if (state.sites[event.site_id]) state.sites[event.site_id].online = event.online;
    if (state.view === "dashboard") renderDashboard();
  });
  signaling.on("consult:participant", (event) => roomParticipant(event));
  signaling.on("consult:updated", (event) => {
    if (state.room && state.room.id === event.consultation.id) {
      state.room.consultation = event.consultation;
      renderRoomSide();
    }
  });
  signaling.on("chat:message", (event) => roomChat(event.message));
  signaling.on("recording:state", (event) => {
    if (state.room && state.room.id === event.consultation_id) {
      state.room.recording = event;
      renderRecording();
    }
  });
  // The server ends a session in words, never a raw code: deactivated or changed in the
  // directory, or a token that ran out (idle, or a `#token=` link past its time).
  signaling.on("session:ended", (event) => {
    endSession(event && event.code === "clinician_changed" ? t("accountChanged") : t("accountDeactivated"));
  });
  signaling.on("token_expired", () => endSession(state.session ? t("idleExpired") : t("tokenExpired")));
  signaling.socket.on("connect", () => {
    // A dropped signaling link came back: take the room up again.
    setServerLink(true);
    if (state.room) rejoinRoom();
  });
  // socket.io reconnects by itself (also after `server:stopping`); the room says so meanwhile.
  signaling.socket.on("disconnect", () => setServerLink(false));
}

/** The banner under the header, while the link to the server is weak (the socket away, or its
 * requests slow: LinkWatch): in words, and announced (the element is an aria-live region). */
function setWeakLink(weak) {
  const el = document.getElementById("weak-link");
  if (!el) return;
  const text = weak ? t("weakLink") : "";
  if (el.textContent !== text) el.textContent = text;
  el.dataset.weak = String(weak);
}

/** The room says while its link to the server is down: media may well go on (it never passes
 * through the server), but chat and the rest wait for the reconnect. */
function setServerLink(connected) {
  const el = document.getElementById("server-link");
  if (el) el.hidden = connected;
}

async function refresh() {
  const { queue, mine } = await state.signaling.queue();
  state.queue = queue;
  state.mine = mine;
  state.consultations = (await state.signaling.http("/api/consultations")).consultations;
  if (state.view === "dashboard") renderDashboard();
}

// -- dashboards ---------------------------------------------------------------------------
/** The tabs above the page, for those who administer the directory (admins, site admins). */
function renderTabs(current) {
  const roles = state.me.roles;
  if (!roles.includes("admin") && !roles.includes("site_admin")) return null;
  const tab = (id, view, label, show) => h("button", { id, role: "tab", "aria-selected": String(current === view),
                                                        onclick: show }, label);
  return h("nav", { class: "tabs", role: "tablist" },
    tab("tab-consult", "dashboard", t("consultTab"), () => renderDashboard()),
    tab("tab-admin", "admin", t("adminTab"), () => showAdmin()));
}

function showAdmin() {
  state.view = "admin";
  const panel = h("div", { id: "admin" });
  root.replaceChildren(renderTabs("admin"), panel);
  renderAdmin(panel, { signaling: state.signaling, me: state.me, roleName });
}

function renderDashboard() {
  state.view = "dashboard";
  const roles = state.me.roles;
  const parts = [];
  if (roles.includes("referring")) parts.push(renderRequestForm(), renderMine());
  if (roles.includes("specialist") || roles.includes("coordinator")) parts.push(renderQueue());
  parts.push(renderConsultations());
  if (roles.includes("coordinator")) parts.push(renderSites());
  root.replaceChildren(...[renderTabs("dashboard"), h("div", { class: "dashboard" }, parts)].filter(Boolean));
}

function renderRequestForm() {
  const specialty = h("select", { id: "request-specialty" },
    state.me.offered_specialties.map((s) => h("option", { value: s }, specialtyName(s))));
  const priority = h("select", { id: "request-priority" },
    ["routine", "urgent", "asap", "stat"].map((p) => h("option", { value: p }, t(p))));
  const reason = h("textarea", { id: "request-reason", rows: 3, maxlength: 2000, required: true });
  const pseudonym = h("input", { id: "request-pseudonym", maxlength: 64, pattern: "[A-Za-z0-9][A-Za-z0-9_.-]*" });
  return h("section", { class: "card", id: "request-form" },
    h("h2", {}, t("requestTitle")),
    h("label", {}, t("specialty"), specialty),
    h("label", {}, t("priority"), priority),
    h("label", {}, t("reason"), reason),
    h("label", {}, t("pseudonym"), pseudonym),
    h("button", { id: "request-send", class: "primary", onclick: async () => {
      if (!reason.value.trim()) { reason.focus(); return; }
      try {
        await state.signaling.request(specialty.value, priority.value, reason.value.trim(),
                                      pseudonym.value.trim() || undefined);
        reason.value = "";
        pseudonym.value = "";
        await refresh();
      } catch (error) { flash(describeError(error)); }
    } }, t("send")));
}

function statusBadge(status) { return h("span", { class: `badge status-${status}` }, t(status)); }
function priorityBadge(priority) { return h("span", { class: `badge priority-${priority}` }, t(priority)); }

function renderMine() {
  const rows = state.mine.slice(0, 20).map((r) => h("li", { class: "request", "data-request": r.id },
    priorityBadge(r.priority), " ", h("strong", {}, specialtyName(r.specialty)), " ", statusBadge(r.status),
    r.status === "waiting" ? h("span", { class: "position" }, ` ${t("position")}: ${r.position}`) : null,
    r.escalated ? h("span", { class: "badge" }, t("escalated")) : null,
    r.status === "waiting" ? h("button", { class: "small", onclick: async () => {
      try { await state.signaling.cancel(r.id); await refresh(); } catch (e) { flash(describeError(e)); }
    } }, t("cancel")) : null,
    r.status === "accepted" && r.consultation_id
      ? h("button", { class: "small primary join", onclick: () => precheck(r.consultation_id) }, t("join")) : null));
  return h("section", { class: "card", id: "my-requests" }, h("h2", {}, t("myRequests")), h("ul", {}, rows));
}

function renderQueue() {
  const rows = state.queue.map((r) => h("li", { class: `request prio-${r.priority}`, "data-request": r.id },
    priorityBadge(r.priority), " ", h("strong", {}, specialtyName(r.specialty)), " · ", siteName(r.site_id),
    " · ", minutesAgo(r.created_at), r.escalated ? h("span", { class: "badge" }, t("escalated")) : null,
    h("p", { class: "reason" }, r.reason),
    h("button", { class: "small primary accept", onclick: async () => {
      try {
        const { consultation } = await state.signaling.accept(r.id);
        refresh().catch(() => {});
        await precheck(consultation.id);
      } catch (error) { flash(describeError(error)); await refresh(); }
    } }, t("accept"))));
  return h("section", { class: "card", id: "queue" }, h("h2", {}, t("queueTitle")), h("ul", {}, rows));
}

function renderConsultations() {
  const today = new Date().setHours(0, 0, 0, 0) / 1000;
  const rows = state.consultations.filter((c) => c.state !== "ended" || c.created_at >= today)
    .map((c) => h("li", { class: "consultation", "data-consultation": c.id },
      statusBadge(c.state), " ", c.site_ids.map(siteName).join(" ↔ "),
      c.minutes ? h("p", { class: "minutes" }, `${t("minutes")}: ${c.minutes.conclusion}`) : null,
      c.state !== "ended" ? h("button", { class: "small primary join", onclick: () => precheck(c.id) }, t("join")) : null,
      c.state !== "ended" && state.me.roles.includes("coordinator") ? renderInvite(c) : null,
      c.state === "ended" ? renderRecordingsButton(c) : null));
  return h("section", { class: "card", id: "consultations" }, h("h2", {}, t("myConsultations")), h("ul", {}, rows));
}

/** The archive of an ended consultation: its files, each downloaded with the access token. */
function renderRecordingsButton(consultation) {
  const box = h("div", { class: "recordings" });
  const button = h("button", { class: "small show-recordings", onclick: async () => {
    try {
      const listing = await state.signaling.recordings(consultation.id);
      if (!listing.files.length) { box.replaceChildren(h("p", {}, t("noRecordings"))); return; }
      box.replaceChildren(h("ul", {}, listing.files.map((f) => h("li", { class: "recording-file", "data-file": f.name },
        `${f.participant_id} · ${f.source === "screen" ? t("shareScreen") : t("camera")} · ${f.duration_s === null ? "–" : Math.round(f.duration_s)} s`,
        f.status !== "complete" ? h("span", { class: "badge" }, f.status) : null,
        h("button", { class: "small download", onclick: async () => {
          try {
            const blob = await state.signaling.download(f.url);
            const link = h("a", { href: URL.createObjectURL(blob), download: f.name });
            link.click();
            setTimeout(() => URL.revokeObjectURL(link.href), 60_000);
          } catch (e) { flash(describeError(e)); }
        } }, t("download"))))));
    } catch (e) { flash(describeError(e)); }
  } }, t("recordings"));
  return h("div", {}, button, box);
}

function renderInvite(consultation) {
  const choices = Object.values(state.sites).filter((s) => !consultation.site_ids.includes(s.id));
  const select = h("select", { class: "invite-site" }, choices.map((s) => h("option", { value: s.id }, `${s.region_name || s.region} · ${s.name}`)));
  return h("span", { class: "invite" }, select, h("button", { class: "small invite-button", onclick: async () => {
    try { await state.signaling.invite(consultation.id, select.value); await refresh(); }
    catch (error) { flash(describeError(error)); }
  } }, t("invite")));
}

function renderSites() {
  // Grouped by province, shown by its Vietnamese name (the code when the directory has none).
  const byRegion = {};
  for (const site of Object.values(state.sites)) (byRegion[site.region_name || site.region] ||= []).push(site);
  return h("section", { class: "card", id: "sites" }, h("h2", {}, t("sitesTitle")),
    Object.keys(byRegion).sort((a, b) => a.localeCompare(b, "vi")).map((region) => h("div", { class: "region" },
      h("h3", {}, region),
      h("ul", {}, byRegion[region].map((s) => h("li", { class: s.online ? "online" : "offline", "data-site": s.id },
        h("span", { class: "dot" }), ` ${s.name} (${s.online ? t("online") : t("offline")})`))))));
}

// -- pre-call check -----------------------------------------------------------------------
/** A line of the pre-call check: "label: result", its state (pending, ok, warn, bad, skip) a class. */
function checkLine(id, label) {
  const line = h("li", { id, class: "pending", "data-state": "pending" }, `${label}: ${t("checking")}`);
  line.set = (lineState, text) => {
    line.className = lineState;
    line.dataset.state = lineState;
    line.textContent = `${label}: ${text}`;
  };
  return line;
}

/** Camera, microphone, the server and the network path to the relay, each explained when it
 * fails; the join button says what the doctor will get, or why it cannot work. */
async function precheck(consultationId) {
  state.view = "precheck";
  if (state.probe) state.probe.abort();
  state.probe = null;
  const video = h("video", { autoplay: true, muted: true, playsinline: true, class: "preview", hidden: true });
  const camera = checkLine("check-camera", t("camera"));
  const microphone = checkLine("check-microphone", t("microphone"));
  const server = checkLine("check-server", t("connection"));
  const network = checkLine("check-network", t("network"));
  const deviceNote = h("p", { id: "precheck-problem", class: "problem", role: "alert", hidden: true });
  const networkNote = h("p", { id: "network-problem", class: "problem", role: "status", hidden: true });
  const joinButton = h("button", { class: "primary", id: "precheck-join", disabled: true }, t("join"));
  const joinReason = h("span", { id: "precheck-join-reason", class: "join-reason" });
  const relayBox = h("input", { type: "checkbox", id: "ice-relay", checked: forceRelay() });
  root.replaceChildren(h("section", { class: "card narrow", id: "precheck" },
    h("h2", {}, t("precheck")), video,
    h("ul", { class: "checks" }, camera, microphone, server, network),
    deviceNote, networkNote,
    h("div", { class: "join-row" }, joinButton, joinReason),
    h("details", { class: "settings", id: "settings", open: forceRelay() },
      h("summary", {}, t("settings")),
      h("label", { class: "inline" }, relayBox, " ", t("forceRelay")))));
  const note = (el, text) => { el.textContent = text || ""; el.hidden = !text; };

  const insecure = originProblem();
  const probeNetwork = () => {
    if (state.probe) state.probe.abort();
    if (insecure) { network.set("skip", t("notChecked")); return; }
    network.set("pending", t("checking"));
    note(networkNote, "");
    const probe = new NetworkProbe(state.signaling, consultationId);
    state.probe = probe;
    probe.run().then(({ path, ms, policy }) => {
      if (state.probe !== probe || !network.isConnected) return;
      network.dataset.path = path;
      network.dataset.ms = String(ms);
      if (path === "direct") network.set("ok", t("networkDirect"));
      else if (path === "relay") {
        // Through TURN because the direct path failed, or because this site must use TURN.
        network.set("warn", t("networkTurn"));
        note(networkNote, policy === "relay" ? t("turnForced") : t("turnOnly"));
      }
      else if (path === "none") { network.set("bad", t("networkNone")); note(networkNote, t("noPath")); }
      else if (path === "waiting") {
        network.set("warn", t("mediaWaiting"));
        note(networkNote, t("mediaWaitingNote"));
      }
      else network.set("skip", t("notChecked"));
    });
  };
  relayBox.onchange = () => { setForceRelay(relayBox.checked); probeNetwork(); };
  probeNetwork();

  const started = performance.now();
  // Devices and the link to the server are checked side by side.
  const [devices, link] = await Promise.allSettled([openDevices(), fetch("/healthz")]);
  const { stream, problem } = devices.status === "fulfilled" ? devices.value : { stream: null, problem: "unknown" };
  if (state.view !== "precheck" || !joinButton.isConnected) {
    if (stream) for (const track of stream.getTracks()) track.stop();
    return;
  }
  const hasVideo = Boolean(stream && stream.getVideoTracks().length);
  const hasAudio = Boolean(stream && stream.getAudioTracks().length);
  if (hasVideo) { video.srcObject = stream; video.hidden = false; }
  camera.set(hasVideo ? "ok" : "bad", hasVideo ? t("checkOk") : t("unavailable"));
  microphone.set(hasAudio ? "ok" : "bad", hasAudio ? t("checkOk") : t("unavailable"));
  if (problem) {
    deviceNote.dataset.problem = problem;
    note(deviceNote, stream ? `${t(EXPLANATION[problem])} ${t("partialDevices")}` : t(EXPLANATION[problem]));
  }
  const linkOk = link.status === "fulfilled" && link.value.ok;
  server.set(linkOk ? "ok" : "bad", `${linkOk ? t("checkOk") : t("checkFail")} (${Math.round(performance.now() - started)} ms)`);
  if (insecure) {
    // Nothing media-related can work on this page: the doctor must come back over https://.
    joinButton.disabled = true;
    joinReason.textContent = t("joinBlockedInsecure");
    return;
  }
  if (!stream) {
    joinButton.textContent = t("joinWatchOnly");
    joinReason.textContent = t("joinWatchOnlyReason");
  }
  joinButton.disabled = false;
  joinButton.onclick = () => {
    joinButton.disabled = true;
    enterRoom(consultationId, stream);
  };
  if (new URLSearchParams(location.search).has("autojoin")) enterRoom(consultationId, stream);
}

// -- the room -----------------------------------------------------------------------------
async function enterRoom(consultationId, stream) {
  // The room's own connections replace the probe's; a probe still running stops here.
  if (state.probe) state.probe.abort();
  state.probe = null;
  state.view = "room";
  let joined;
  try {
    joined = await state.signaling.join(consultationId);
  } catch (error) {
    if (stream) for (const track of stream.getTracks()) track.stop();
    flash(describeError(error));
    state.view = "dashboard";
    await refresh().catch(() => {});
    return;
  }
  const room = {
    id: consultationId, consultation: joined.consultation, participants: {}, tiles: {},
    chat: [], media: null, stream, recording: joined.recording,
    quality: {},          // publication id -> {quality, fps}: the relay's video_quality notices
    videoPaused: false,   // video_paused .. video_resumed: every remote video paused for bandwidth
    ownLink: null,        // the last own-link measure (measureOwnLink)
  };
  for (const p of joined.participants) room.participants[p.clinician_id] = p;
  state.room = room;
  if (state.session) state.session.inRoom = true;
  renderRoom();
  for (const message of joined.chat) roomChat(message);
  room.media = new MediaSession(state.signaling, consultationId, {
    onTrack: ({ publication, track }) => attachTrack(publication, track),
    onTrackGone: (publicationId) => detachTrack(publicationId),
    onState: (mediaState) => setRoomState(mediaState),
    onNotice: (notice) => roomNotice(room, notice),
    onProblem: (problem) => setMediaProblem(problem),
    onRefusal: (error) => flash(describeError(error)),
  });
  if (testHooks) testHooks.media = room.media;
  if (stream) addLocalTile(stream);
  // A refusal is flashed (onRefusal) and the session tries again by itself.
  await room.media.start(stream);
}

/** The room says when media has no path to the relay (ICE failed, even through TURN), or
 * waits for a relay (the consultation has none now). */
function setMediaProblem(problem) {
  const el = document.getElementById("media-problem");
  if (!el) return;
  el.dataset.problem = problem || "";
  el.textContent = problem === "nopath" ? t("noPath") : problem === "waiting" ? t("mediaWaitingNote") : "";
  el.hidden = !problem;
}

/** The signaling connection came back (a network blip, or the server restarted): join the
 * consultation again (a restarted server has no live state), then resume the media, which kept
 * flowing meanwhile: the relay keeps it and the connections stay (docs/protocol.md, rule 3).
 * A refusal that may pass (the server still starting) is tried again, a few times. */
async function rejoinRoom() {
  const room = state.room;
  if (!room) return;
  for (let attempt = 1; ; attempt += 1) {
    try {
      const joined = await state.signaling.join(room.id);
      if (state.room !== room) return;
      room.consultation = joined.consultation;
      room.participants = {};
      for (const p of joined.participants) room.participants[p.clinician_id] = p;
      room.recording = joined.recording;
      renderRoomSide();
      renderRecording();
      break;
    } catch (error) {
      const final = error instanceof ProtocolRefusal
        && ["forbidden", "not_found", "invalid_state", "token_expired", "unauthenticated"].includes(error.code);
      if (final || attempt >= 4 || !state.signaling.connected) {
        if (state.signaling.connected) flash(describeError(error));
        return;
      }
      console.warn(`consult:join after a reconnect refused (${error.code || error.message}); trying again`);
      await new Promise((resolve) => setTimeout(resolve, 1000 * attempt));
      if (state.room !== room) return;
    }
  }
  if (room.media) room.media.resume("signaling reconnected");
}

/** Share the screen; a refusal (the doctor cancelled, or a policy) is explained, not raw. */
async function shareScreen(room) {
  try {
    await room.media.shareScreen();
  } catch (error) {
    console.warn("media: getDisplayMedia failed:", error && error.name, error && error.message);
    throw new Explained(t("screenDenied"));
  }
}

function setRoomState(mediaState) {
  const el = document.getElementById("room-state");
  if (!el) return;
  el.dataset.state = mediaState;
  el.textContent = mediaState === "reconnecting" ? t("reconnecting")
    : mediaState === "connected" ? t("connected") : mediaState === "failed" ? t("mediaFailed")
    : mediaState === "waiting" ? t("mediaWaiting") : t("connecting");
  el.className = `room-state state-${mediaState}`;
}

function renderRoom() {
  const room = state.room;
  const isHost = room.consultation.host_id === state.me.clinician.id || state.me.roles.includes("coordinator");
  const conclusion = h("textarea", { id: "conclusion", rows: 3, placeholder: t("conclusion") });
  const chatInput = h("input", { id: "chat-input", maxlength: 4000 });
  const sendChat = async () => {
    const text = chatInput.value.trim();
    if (!text) return;
    try { await state.signaling.chat(room.id, text); chatInput.value = ""; } catch (e) { flash(describeError(e)); }
  };
  // A control that cannot work here is disabled, and says why.
  const toggle = (id, on, off, handler, unavailable = null) => {
    const button = h("button", { id, "aria-pressed": "false", disabled: Boolean(unavailable), title: unavailable }, on);
    button.onclick = async () => {
      const pressed = button.getAttribute("aria-pressed") !== "true";
      try {
        await handler(pressed);
        button.setAttribute("aria-pressed", String(pressed));
        button.textContent = pressed ? off : on;
      } catch (error) { flash(describeError(error)); }
    };
    return button;
  };
  const stream = room.stream;
  const noAudio = stream && stream.getAudioTracks().length ? null : t("noDeviceControl");
  const noVideo = stream && stream.getVideoTracks().length ? null : t("noDeviceControl");
  const canShare = Boolean(navigator.mediaDevices && navigator.mediaDevices.getDisplayMedia);
  const devices = h("select", { id: "device-picker", title: t("devices"), disabled: !stream });
  if (stream) navigator.mediaDevices.enumerateDevices().then((list) => {
    for (const d of list.filter((x) => x.kind === "videoinput" || x.kind === "audioinput")) {
      devices.append(h("option", { value: `${d.kind}|${d.deviceId}` }, `${d.kind === "videoinput" ? t("camera") : t("microphone")}: ${d.label || d.deviceId.slice(0, 8)}`));
    }
  });
  devices.onchange = async () => {
    const [kind, id] = devices.value.split("|");
    try { await room.media.useDevice(kind === "videoinput" ? "video" : "audio", id); } catch (e) { flash(describeError(e)); }
  };
  root.replaceChildren(h("div", { class: "room", id: "room", "data-consultation": room.id },
    h("div", { class: "stage" },
      h("div", { class: "room-bar" },
        h("span", { id: "room-state", class: "room-state" }, t("connecting")),
        h("span", { id: "server-link", class: "server-link", role: "status",
                    hidden: state.signaling.connected }, t("serverReconnecting")),
        h("span", { id: "quality", class: "quality" }, ""),
        h("span", { id: "own-link", class: "own-link", role: "status" }, ""),
        h("span", { id: "recording-box", class: "recording-box" })),
      h("div", { id: "screens", class: "screens" }),
      h("div", { id: "tiles", class: "tiles" }),
      h("div", { class: "controls" },
        toggle("mute", t("mute"), t("unmute"), (on) => room.media.setMuted(on), noAudio),
        toggle("camera", t("cameraOff"), t("cameraOn"), (on) => room.media.setCameraOff(on), noVideo),
        toggle("share", t("shareScreen"), t("stopShare"), (on) => on ? shareScreen(room) : room.media.stopScreen(),
               canShare ? null : t("screenUnavailable")),
        toggle("audio-only", t("audioOnly"), t("videoBack"), (on) => room.media.setAudioOnly(on)),
        devices,
        h("button", { id: "leave", class: "danger", onclick: async () => {
          await state.signaling.leave(room.id).catch(() => {});
          closeRoom();
        } }, t("leave"))),
      noAudio && noVideo ? h("p", { id: "controls-note", class: "muted" }, t("joinWatchOnlyReason")) : null,
      h("p", { id: "media-problem", class: "problem", role: "alert", hidden: true })),
    h("aside", { class: "side" },
      h("h3", {}, t("participants")), h("ul", { id: "participants" }),
      h("h3", {}, t("chat")), h("ul", { id: "chat" }),
      h("div", { class: "chat-input" }, chatInput, h("button", { id: "chat-send", onclick: sendChat }, t("sendChat"))),
      isHost ? h("div", { class: "end", id: "end-box" }, conclusion, h("button", { id: "end", class: "danger", onclick: async () => {
        const text = conclusion.value.trim();
        if (!text) { conclusion.focus(); return; }
        try { await state.signaling.end(room.id, text); } catch (e) { flash(describeError(e)); }
      } }, t("endConsultation"))) : null)));
  chatInput.addEventListener("keydown", (e) => { if (e.key === "Enter") sendChat(); });
  renderRoomSide();
  renderRecording();
  room.qualityTimer = setInterval(updateQuality, 1000);
}

/** Recording: everyone sees whether it is on; with consent each participant is asked (later
 * joiners too); the host starts and stops it. */
function renderRecording() {
  const room = state.room;
  const box = document.getElementById("recording-box");
  if (!room || !box) return;
  const rec = room.recording || { status: "off", consent: [], policy: null };
  box.dataset.status = rec.status;
  const label = { on: `● ${t("recording")}`, pending: t("recordingPending"), failed: t("recordingFailed"),
                  declined: t("recordingDeclined"), stopped: t("recordingStopped") }[rec.status];
  const parts = [];
  if (label) {
    parts.push(h("span", { id: "recording", class: `recording ${rec.status}`, title: rec.error || "" }, label));
  }
  const me = state.me.clinician.id;
  const mine = (rec.consent || []).find((c) => c.clinician_id === me);
  if (rec.policy === "with_consent" && mine && mine.answer === "pending" && rec.status !== "stopped") {
    const answer = async (agree) => {
      try {
        const result = await state.signaling.recordingConsent(room.id, agree);
        room.recording = result.recording;
        renderRecording();
      } catch (e) { flash(describeError(e)); }
    };
    parts.push(h("div", { id: "consent-prompt", class: "consent", role: "dialog" },
      h("p", {}, t("consentQuestion")),
      h("button", { id: "consent-agree", class: "primary", onclick: () => answer(true) }, t("agree")),
      h("button", { id: "consent-decline", onclick: () => answer(false) }, t("decline"))));
  }
  const isHost = room.consultation.host_id === me || state.me.roles.includes("coordinator");
  if (isHost && rec.status !== "disabled") {
    const recording = rec.status === "on" || rec.status === "pending";
    parts.push(h("button", { id: "recording-toggle", onclick: async () => {
      try {
        const result = recording ? await state.signaling.recordingStop(room.id) : await state.signaling.recordingStart(room.id);
        room.recording = result.recording;
        renderRecording();
      } catch (e) { flash(describeError(e)); }
    } }, recording ? t("stopRecording") : t("startRecording")));
  }
  box.replaceChildren(...parts);
}

function updateQuality() {
  const room = state.room;
  const el = document.getElementById("quality");
  if (!room || !room.media || !el) return;
  const s = room.media.stats;
  el.textContent = `${t("quality")}: ${t(s.quality)} · ${Math.round(s.bitrateKbps)} kbps · ${s.rttMs === null ? "–" : Math.round(s.rttMs)} ms · ${s.lossPct.toFixed(1)}%`;
  el.dataset.quality = s.quality;
  el.dataset.path = s.path || "";
  if (s.path === "relay") el.textContent += " · TURN";
  // Active speaker: the loudest remote audio above a floor.
  let loudest = null;
  let level = 0.02;
  for (const inbound of Object.values(s.inbound)) {
    if (inbound.kind === "audio" && inbound.audioLevel > level) { level = inbound.audioLevel; loudest = inbound.participant; }
  }
  for (const [participant, tile] of Object.entries(room.tiles)) tile.classList.toggle("speaking", participant === loudest);
  renderTileQualities();
  room.ticks = (room.ticks || 0) + 1;
  if (room.ticks % OWN_LINK_EVERY_S === 0 && !room.measuring) {
    room.measuring = true;
    measureOwnLink(room).catch((e) => console.warn("own link:", e && e.message))
      .finally(() => { room.measuring = false; });
  }
}

/** A media notice for this participant: a publication's received quality changed
 * (`video_quality`), or every remote video was paused or resumed for bandwidth. */
function roomNotice(room, notice) {
  if (notice.code === "video_quality") {
    room.quality[notice.publication_id] = { quality: notice.quality, fps: notice.fps ?? null };
  } else if (notice.code === "video_paused" || notice.code === "video_resumed") {
    room.videoPaused = notice.code === "video_paused";
    flash(t(notice.code === "video_paused" ? "videoPaused" : "videoResumed"), "info");
  } else {
    console.info("media notice", notice.code);
  }
  if (state.room === room) renderTileQualities();
}

/** What this viewer receives of a remote tile now: audio only while its video is paused (the
 * relay's video_paused, or the viewer's own audio-only choice) or it has none; else what the
 * relay last said of its video publication (`video_quality`), full until it says otherwise. */
function receivedQuality(room, tile) {
  const publication = tile.video.dataset.publication;
  if (room.videoPaused || (room.media && room.media.audioOnly) || !publication) {
    return { quality: "audio_only", fps: null };
  }
  return room.quality[publication] || { quality: "full", fps: null };
}

/** Each remote tile says in words what the viewer receives of it (not by colour alone). */
function renderTileQualities() {
  const room = state.room;
  if (!room) return;
  for (const [participant, tile] of Object.entries(room.tiles)) {
    if (participant === "self" || !tile.qualityLabel) continue;
    const { quality, fps } = receivedQuality(room, tile);
    let text = t({ full: "qualityFull", reduced: "qualityReduced", thin: "qualityThin", audio_only: "qualityAudioOnly" }[quality] || "qualityFull");
    if ((quality === "reduced" || quality === "thin") && fps) {
      const shown = fps.toLocaleString(getLanguage() === "vi" ? "vi-VN" : "en-GB", { maximumFractionDigits: 1 });
      text += ` (${tf("framesPerSecond", { fps: shown })})`;
    }
    const label = tile.qualityLabel;
    if (label.textContent !== text) label.textContent = text;
    label.dataset.quality = quality;
  }
}

/** The own link is measured every this many seconds (getStats of up to three connections). */
const OWN_LINK_EVERY_S = 2;

/** The own link in three words, from what the browser measures of its own connections.
 * Weak: a round trip over 1 s (past ITU-T G.114's 400 ms one way, talk turns awkward), over
 * 5 % of packets lost (audio concealment becomes audible even with Opus FEC), or the camera's
 * video held back by the bandwidth estimate (`limited`) under 150 kbps (audio and the base
 * video layer no longer fit). Fair: over 300 ms (a satellite hop is always at least this),
 * over 1 % lost, or the video held back by the estimate at all. The available outgoing bitrate
 * alone says little: with the relay's REMB it follows what the encoder sends (an estimate
 * grows only ~1.5 times past the rate it sees), so a still picture on a LAN "can send" 100 kbps;
 * only when the encoder itself says the bandwidth holds it back is the figure a limit. */
function linkLevel(rttMs, lossPct, outgoingBps, limited) {
  const thin = limited && outgoingBps !== null && outgoingBps < 150_000;
  if ((rttMs !== null && rttMs > 1000) || lossPct > 5 || thin) return "weak";
  if ((rttMs !== null && rttMs > 300) || lossPct > 1 || limited) return "fair";
  return "good";
}

/** Read the participant's own connections' getStats(): the selected candidate pairs' round
 * trip (the longest) and available outgoing bitrate (the publish connections'), the loss the
 * relay reports of what this page sends (remote-inbound-rtp) and the loss of what it receives
 * since the last measure; show the level in words, the figures in its title. */
async function measureOwnLink(room) {
  const media = room.media;
  const el = document.getElementById("own-link");
  if (!media || !el) return;
  const sending = [media.publishPc, media.screenPc].filter(Boolean);
  const pcs = [...sending, media.subscribePc].filter(Boolean);
  if (!pcs.length) return;
  let rtt = null;
  let outgoing = null;
  let upLoss = 0;
  let limited = false;
  let lost = 0;
  let received = 0;
  for (const pc of pcs) {
    const report = await pc.getStats();
    report.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) {
        const pair = report.get(s.selectedCandidatePairId);
        if (pair && pair.currentRoundTripTime !== undefined) rtt = Math.max(rtt ?? 0, pair.currentRoundTripTime * 1000);
        if (pair && pair.availableOutgoingBitrate !== undefined && sending.includes(pc)) {
          outgoing = Math.min(outgoing ?? Infinity, pair.availableOutgoingBitrate);
        }
      }
      if (s.type === "remote-inbound-rtp" && s.fractionLost !== undefined) upLoss = Math.max(upLoss, 100 * s.fractionLost);
      if (s.type === "outbound-rtp" && s.kind === "video" && s.qualityLimitationReason === "bandwidth") limited = true;
      if (s.type === "inbound-rtp") { lost += Math.max(0, s.packetsLost || 0); received += s.packetsReceived || 0; }
    });
  }
  if (state.room !== room) return;
  const previous = room.ownLink || { lost: 0, received: 0 };
  const dLost = Math.max(0, lost - previous.lost);
  const dReceived = Math.max(0, received - previous.received);
  const downLoss = dLost + dReceived > 0 ? (100 * dLost) / (dLost + dReceived) : 0;
  const lossPct = Math.max(upLoss, downLoss);
  const level = linkLevel(rtt, lossPct, outgoing, limited);
  room.ownLink = { lost, received, level, rttMs: rtt, lossPct, outgoingBps: outgoing, limited };
  const text = `${t("ownLink")}: ${t({ good: "linkGood", fair: "linkFair", weak: "linkWeak" }[level])}`;
  if (el.textContent !== text) el.textContent = text;
  el.title = tf("linkFigures", { rtt: rtt === null ? "–" : `${Math.round(rtt)} ms`, loss: `${lossPct.toFixed(1)} %`,
                                 kbps: outgoing === null ? "–" : `${Math.round(outgoing / 1000)} kbps` });
  el.dataset.level = level;
  el.dataset.rttMs = rtt === null ? "" : String(Math.round(rtt));
  el.dataset.lossPct = lossPct.toFixed(1);
  el.dataset.outgoingKbps = outgoing === null ? "" : String(Math.round(outgoing / 1000));
  el.dataset.limited = String(limited);
}

function renderRoomSide() {
  const room = state.room;
  const list = document.getElementById("participants");
  if (!room || !list) return;
  list.replaceChildren(...Object.values(room.participants).map((p) => h("li", { "data-participant": p.clinician_id, class: `participant ${p.state}` },
    `${p.name || p.clinician_id} · ${p.site_name || siteName(p.site_id)}`,
    p.clinician_id === room.consultation.host_id ? h("span", { class: "badge" }, t("host")) : null,
    p.state === "reconnecting" ? h("span", { class: "badge" }, t("reconnecting")) : null)));
}

function roomParticipant(event) {
  const room = state.room;
  if (!room || event.consultation_id !== room.id) return;
  const p = event.participant;
  if (event.event === "left") delete room.participants[p.clinician_id];
  else room.participants[p.clinician_id] = p;
  renderRoomSide();
}

function roomChat(message) {
  const room = state.room;
  const list = document.getElementById("chat");
  if (!room || !list || message.consultation_id !== room.id) return;
  const sender = room.participants[message.sender_id];
  list.append(h("li", { class: "chat-message" },
    h("strong", {}, sender ? sender.name : message.sender_id), ": ", message.text));
  list.scrollTop = list.scrollHeight;
}

function tileFor(participantId) {
  const room = state.room;
  if (room.tiles[participantId]) return room.tiles[participantId];
  const p = room.participants[participantId] || { name: participantId, site_id: "" };
  const video = h("video", { autoplay: true, playsinline: true });
  const audio = h("audio", { autoplay: true });
  const stream = new MediaStream();
  const qualityLabel = h("span", { class: "tile-quality", title: t("receivedQuality") });
  const tile = h("figure", { class: "tile", "data-participant": participantId },
    video, audio, h("figcaption", {}, `${p.name || participantId} · ${p.site_name || siteName(p.site_id)} · ${(p.roles || []).map(roleName).join(", ")} `,
                    qualityLabel));
  tile.qualityLabel = qualityLabel;
  tile.stream = stream;
  tile.video = video;
  tile.audio = audio;
  room.tiles[participantId] = tile;
  document.getElementById("tiles").append(tile);
  return tile;
}

function attachTrack(publication, track) {
  const room = state.room;
  if (!room) return;
  track.publicationId = publication.id;
  if (publication.source === "screen") {
    const screens = document.getElementById("screens");
    if (screens.querySelector(`[data-publication="${publication.id}"]`)) return;
    const video = h("video", { autoplay: true, playsinline: true, muted: true, class: "screen", "data-publication": publication.id });
    video.srcObject = new MediaStream([track]);
    screens.append(video);
    return;
  }
  const tile = tileFor(publication.participant_id);
  const element = track.kind === "video" ? tile.video : tile.audio;
  if (element.srcObject && element.srcObject.getTracks()[0] === track) return;
  if (track.kind === "video") {
    tile.video.srcObject = new MediaStream([track]);
    tile.video.dataset.publication = publication.id;
    noteFirstFrame(tile.video, publication.participant_id);
  } else {
    tile.audio.srcObject = new MediaStream([track]);
    tile.audio.dataset.publication = publication.id;
  }
  renderTileQualities();
}

/** For the tests: remember (epoch ms) when a participant's video first showed a frame. */
function noteFirstFrame(video, participantId) {
  if (!testHooks) return;
  const shown = testHooks.firstFrame;
  if (shown[participantId] || !video.requestVideoFrameCallback) return;
  video.requestVideoFrameCallback(() => {
    shown[participantId] = performance.timeOrigin + performance.now();
  });
}

function detachTrack(publicationId) {
  const room = state.room;
  if (!room) return;
  const screen = document.querySelector(`#screens [data-publication="${publicationId}"]`);
  if (screen) screen.remove();
  for (const [participant, tile] of Object.entries(room.tiles)) {
    for (const media of [tile.video, tile.audio]) {
      if (media.dataset.publication === publicationId) { media.srcObject = null; delete media.dataset.publication; }
    }
    if (!tile.video.dataset.publication && !tile.audio.dataset.publication && participant !== "self") {
      tile.remove();
      delete room.tiles[participant];
    }
  }  renderTileQualities();
}

function addLocalTile(stream) {
  const video = h("video", { autoplay: true, muted: true, playsinline: true });
  video.srcObject = stream;
  const tile = h("figure", { class: "tile self", "data-participant": "self" }, video, h("figcaption", {}, t("you")));
  tile.video = video;
  tile.audio = h("audio");
  state.room.tiles.self = tile;
  document.getElementById("tiles").prepend(tile);
}

function closeRoom(ended) {
  const room = state.room;
  if (!room) return;
  clearInterval(room.qualityTimer);
  if (room.media) room.media.close();
  if (room.stream) for (const track of room.stream.getTracks()) track.stop();
  state.room = null;
  if (state.session) state.session.inRoom = false;
  state.view = "dashboard";
  if (ended && ended.minutes) flash(`${t("minutes")}: ${ended.minutes.conclusion}`, "info");
  refresh().catch((e) => flash(describeError(e)));
}

// -- boot -----------------------------------------------------------------------------------
function boot() {
  setLanguage(getLanguage());
  const switcher = document.getElementById("language");
  switcher.value = getLanguage();
  switcher.onchange = () => { setLanguage(switcher.value); location.reload(); };
  document.getElementById("title").textContent = t("title");
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.get("activate")) { renderActivation(params.get("activate")); return; }
  const failed = params.get("signin-error");
  if (failed) history.replaceState(null, "", location.pathname + location.search);
  const token = tokenFromLocation();
  if (token) { start(token); return; }
  // A doctor reopening the tab is not asked again: the refresh cookie brings the session back.
  root.replaceChildren(h("p", { class: "muted" }, t("connecting")));
  const session = new Session();
  session.refresh().then(() => start(session.token, session), () => {
    renderSignIn(failed ? describeAuth(new AuthRefusal(400, { code: failed })) : undefined);
  });
}

boot();
