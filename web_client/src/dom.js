// What every page of the client builds its elements with, and the one flash bar. No inline
// script or style ever: the server's CSP (`script-src 'self'; style-src 'self'`) forbids them.

/** Tiny element builder: h("div", {class: "x", onclick}, child, ...) */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** A message in the bar under the header; it goes away by itself after 6 s. */
export function flash(message, kind = "error") {
  const bar = document.getElementById("flash");
  bar.textContent = message;
  bar.className = `flash ${kind}`;
  bar.hidden = !message;
  if (message) setTimeout(() => { if (bar.textContent === message) bar.hidden = true; }, 6000);
}
