// Client settings that a site's IT team (or a test) sets on a PC and that outlive the page.
// Today one: relay-only ICE, for hospitals whose firewalls let nothing through but TURN. It is
// set by `?ice=relay` in the address (`?ice=all` clears it) or by the checkbox in the pre-call
// check, and kept in localStorage.

const ICE_KEY = "telehealth.ice";

const requested = new URLSearchParams(location.search).get("ice");
if (requested === "relay") localStorage.setItem(ICE_KEY, "relay");
else if (requested === "all") localStorage.removeItem(ICE_KEY);

/** Whether this browser forces relay-only ICE. */
export function forceRelay() { return localStorage.getItem(ICE_KEY) === "relay"; }

/** @param {boolean} on */
export function setForceRelay(on) {
  if (on) localStorage.setItem(ICE_KEY, "relay");
  else localStorage.removeItem(ICE_KEY);
}

/**
 * The `iceTransportPolicy` for a peer connection: "relay" when this browser forces it or the
 * server says so for this site (`ice_transport_policy` in the `media:join` ack), else "all".
 * @param {?string} serverPolicy
 * @returns {"all"|"relay"}
 */
export function icePolicy(serverPolicy) {
  return forceRelay() || serverPolicy === "relay" ? "relay" : "all";
}
