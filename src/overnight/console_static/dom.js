// Small DOM helpers. Text always goes in through textContent (never innerHTML), so
// nothing a server or a file name says can become markup.

/**
 * Create an element: h("button", {type: "button", onclick: f}, "Cancel").
 * Props: "class", "text", on<event> listeners; anything else is an attribute
 * (true means present, false / null / undefined means absent).
 */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace an element's children. */
export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

let counter = 0;
/** A document-unique id for label / describedby wiring. */
export function uid(prefix) {
  counter += 1;
  return `${prefix}-${counter}`;
}

/** A <time> for a Unix timestamp in seconds, shown in the reader's locale. */
export function time(seconds) {
  const d = new Date(seconds * 1000);
  return h("time", {datetime: d.toISOString(), text: d.toLocaleString(undefined, {dateStyle: "medium", timeStyle: "medium"})});
}

/** "1.2 MB": file sizes in decimal units, as they are usually quoted. */
export function bytes(n) {
  if (!Number.isFinite(n)) return "";
  const units = ["bytes", "kB", "MB", "GB", "TB"];
  let i = 0;
  let v = n;
  while (v >= 1000 && i < units.length - 1) {
    v /= 1000;
    i += 1;
  }
  return i === 0 ? `${n} ${n === 1 ? "byte" : "bytes"}` : `${v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

/** "model_template" -> "Model template". */
export function humanize(key) {
  const s = String(key).replace(/_/g, " ");
  return s.charAt(0).toUpperCase() + s.slice(1);
}

/** A description list from [label, value] pairs (a value may be a Node). */
export function kvList(pairs, className = "kv") {
  return h("dl", {class: className}, pairs.map(([label, value]) => [h("dt", {text: label}), h("dd", {}, value)]));
}
