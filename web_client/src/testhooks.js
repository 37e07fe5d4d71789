// Test hooks: what the browser tests (tests/web) read from a running page. They exist only on a
// page loaded with `?test-hooks` in its address (read once, when the page loads); a page loaded
// without it puts nothing on `window`.

const enabled = new URLSearchParams(location.search).has("test-hooks");

/**
 * `window.telehealthTest` when the page was loaded with `?test-hooks`, else null.
 * @type {?{media: ?import("./media.js").MediaSession, firstFrame: Object<string, number>,
 *   session: ?import("./auth.js").Session}}
 *   media: the latest MediaSession (its `stats`, `timeline`, `listenerCount`, `state`, and
 *     `pcsCreated` / `resumes`: peer connections created, and media:join answers that kept
 *     them, so a test sees that a resumed session rebuilt nothing);
 *   firstFrame: per participant, when (epoch ms) their video first showed a frame;
 *   session: the signed-in session (its `refreshes`), null for a `#token=` link.
 */
export const testHooks = enabled ? { media: null, firstFrame: {}, session: null } : null;

if (testHooks) window.telehealthTest = testHooks;
