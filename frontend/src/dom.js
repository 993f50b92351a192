// Tiny DOM builder. Every piece of text goes through textContent, never HTML markup: layer and run names come from
// user models and log directories, and must show as text whatever characters they hold.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key === "style") Object.assign(el.style, value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function clear(el) {
  el.replaceChildren();
  return el;
}

/** A status message in place of a chart: `kind` is "loading", "empty" or "error"; `lines` are plain text. */
export function message(kind, title, ...lines) {
  return h(
    "div",
    { class: `message message-${kind}`, role: kind === "error" ? "alert" : "status" },
    h("div", { class: "message-title", text: title }),
    lines.map((line) => h("div", { class: "message-line", text: line })),
  );
}

export function formatStep(step) {
  return Number.isFinite(step) ? Math.round(step).toLocaleString("en-US") : "–";
}

export function formatValue(v) {
  if (v === null || v === undefined) return "absent";
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(3);
  return v.toPrecision(4);
}

/** Short axis label: plain digits for moderate numbers, 1e+9 style beyond (no float noise like 2.4999999e+36). */
export function formatTick(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e4 || a < 1e-3) {
    const [m, e] = v.toExponential(1).split("e");
    return `${m.replace(/\.0$/, "")}e${Number(e)}`;
  }
  return String(Number(v.toPrecision(3)));
}
