// What stops a doctor's media, named so that the interface can explain it in words a doctor can
// act on (i18n.js). The browser's own error text ("Cannot read properties of undefined (reading
// 'getUserMedia')", "Permission denied") never reaches the page: it goes to the console, where
// the hospital IT team looks.

/**
 * @typedef {"insecure"|"permission"|"nodevice"|"busy"|"unknown"} DeviceProblem
 *   insecure: the page is not a secure origin (plain http:// on another machine), so the browser
 *     hides `navigator.mediaDevices` altogether; permission: the doctor or a policy blocked the
 *     camera/microphone; nodevice: none plugged in, or none matching; busy: another application
 *     holds the device; unknown: anything else.
 */

/** The interface string (i18n.js key) that explains each problem. */
export const EXPLANATION = {
  insecure: "insecureOrigin", permission: "permissionDenied", nodevice: "noDevice",
  busy: "deviceBusy", unknown: "mediaUnknown",
};

/** "insecure" when this page may not use camera and microphone at all, else null. Browsers
 * expose `navigator.mediaDevices` only to secure origins (https://, or http://localhost). */
export function originProblem() {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return "insecure";
  }
  return null;
}

/** The problem behind a getUserMedia/getDisplayMedia rejection (DOMException names from the
 * Media Capture spec, and the older Chromium names some builds still use). */
export function deviceProblem(error) {
  const name = (error && error.name) || "";
  if (name === "NotAllowedError" || name === "SecurityError" || name === "PermissionDeniedError") {
    return "permission";
  }
  if (name === "NotFoundError" || name === "OverconstrainedError" || name === "DevicesNotFoundError"
      || name === "ConstraintNotSatisfiedError") {
    return "nodevice";
  }
  if (name === "NotReadableError" || name === "AbortError" || name === "TrackStartError") return "busy";
  if (name === "TypeError" && originProblem()) return "insecure";
  return "unknown";
}

/**
 * Open camera and microphone for the pre-call check. Without a camera (or a microphone) the
 * doctor still gets what there is: a missing device is retried as audio alone, then video alone.
 * @returns {Promise<{stream: ?MediaStream, problem: ?DeviceProblem}>} a stream with what could be
 *   opened (null when nothing), and the problem that stopped the rest (null when nothing did).
 */
export async function openDevices() {
  const insecure = originProblem();
  if (insecure) {
    console.warn("media: not a secure origin: camera and microphone are unavailable; isSecureContext",
                 window.isSecureContext, "mediaDevices",
                 typeof navigator.mediaDevices);
    return { stream: null, problem: insecure };
  }
  try {
    return { stream: await navigator.mediaDevices.getUserMedia({ audio: true, video: true }), problem: null };
  } catch (error) {
    console.warn("media: getUserMedia(audio+video) failed:", error && error.name, error && error.message);
    const problem = deviceProblem(error);
    if (problem !== "nodevice" && problem !== "busy") return { stream: null, problem };
    for (const constraints of [{ audio: true }, { video: true }]) {
      try {
        return { stream: await navigator.mediaDevices.getUserMedia(constraints), problem };
      } catch (again) {
        console.warn(`media: getUserMedia(${Object.keys(constraints)[0]}) failed:`,
                     again && again.name, again && again.message);
      }
    }
    return { stream: null, problem };
  }
}
