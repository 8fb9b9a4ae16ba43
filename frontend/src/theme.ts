/**
 * Light/dark theme: follows TensorBoard's own dark mode (the `dark-mode` class
 * TensorBoard puts on its body, which already follows `prefers-color-scheme`
 * unless the user overrides it) when the iframe can reach its parent, and
 * `prefers-color-scheme` otherwise.
 */

export type Theme = "light" | "dark";

function parentDark(): boolean | null {
  try {
    const body = window.parent && window.parent !== window ? window.parent.document.body : null;
    if (!body) return null;
    return body.classList.contains("dark-mode");
  } catch {
    return null; // cross-origin parent
  }
}

export function currentTheme(): Theme {
  const fromParent = parentDark();
  if (fromParent !== null) return fromParent ? "dark" : "light";
  return window.matchMedia?.("(prefers-color-scheme: dark)").matches ? "dark" : "light";
}

/** Applies the theme to the document and calls `onChange` when it changes. */
export function watchTheme(onChange: (theme: Theme) => void): Theme {
  let theme = currentTheme();
  document.documentElement.dataset.theme = theme;
  const update = () => {
    const next = currentTheme();
    if (next === theme) return;
    theme = next;
    document.documentElement.dataset.theme = theme;
    onChange(theme);
  };
  window.matchMedia?.("(prefers-color-scheme: dark)").addEventListener?.("change", update);
  try {
    const body = window.parent !== window ? window.parent.document.body : null;
    if (body) new MutationObserver(update).observe(body, { attributes: true, attributeFilter: ["class"] });
  } catch {
    // cross-origin parent: prefers-color-scheme only
  }
  return theme;
}

/** Reads a CSS custom property of the document. */
export function cssVar(name: string): string {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}
