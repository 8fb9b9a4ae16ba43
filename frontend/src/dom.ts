/**
 * DOM helpers. Every string coming from data (run names, tags, layer names,
 * evidence) goes through text nodes: nothing here ever touches innerHTML.
 */

type Child = Node | string | null | undefined | false;

export interface Attrs {
  class?: string;
  title?: string;
  type?: string;
  placeholder?: string;
  data?: Record<string, string>;
  on?: Partial<Record<keyof HTMLElementEventMap, (event: Event) => void>>;
}

export function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  children: Child[] = [],
): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (attrs.class) node.className = attrs.class;
  if (attrs.title !== undefined) node.title = attrs.title;
  if (attrs.type !== undefined) node.setAttribute("type", attrs.type);
  if (attrs.placeholder !== undefined) node.setAttribute("placeholder", attrs.placeholder);
  for (const [key, value] of Object.entries(attrs.data ?? {})) node.dataset[key] = value;
  for (const [name, handler] of Object.entries(attrs.on ?? {})) {
    if (handler) node.addEventListener(name, handler);
  }
  append(node, children);
  return node;
}

export function append(parent: Node, children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    parent.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
}

export function clear(node: Node): void {
  while (node.firstChild) node.removeChild(node.firstChild);
}

/** Formats a number compactly for labels and evidence. */
export function fmt(value: unknown): string {
  if (typeof value === "number") {
    if (!Number.isFinite(value)) return String(value);
    const abs = Math.abs(value);
    if (Number.isInteger(value) && abs < 1e9) return String(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(3);
    return value.toPrecision(4);
  }
  if (typeof value === "string") return value;
  if (Array.isArray(value)) return `[${value.map(fmt).join(", ")}]`;
  if (value !== null && typeof value === "object") {
    return `{${Object.entries(value).map(([k, v]) => `${k}: ${fmt(v)}`).join(", ")}}`;
  }
  return String(value);
}

/** Short axis labels: 7.9e+8 rather than 786,500,000 (which would not fit). */
export function axisLabel(value: number | null): string {
  if (value === null || !Number.isFinite(value)) return "";
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) {
    const [mantissa, exponent] = value.toExponential(1).split("e");
    return `${mantissa.replace(/\.0$/, "")}e${Number(exponent)}`;
  }
  return String(Number(value.toPrecision(4)));
}
