// What every script of the pages shares: Django's JavaScript catalog
// (/jsi18n/, loaded before the modules; stand-ins that keep the English when
// it did not load) and making an element with its class and text.

export const gettext = window.gettext || ((s) => s);
export const ngettext = window.ngettext || ((singular, plural, n) => (n === 1 ? singular : plural));
const interpolate = window.interpolate
  || ((format, values) => format.replace(/%\((\w+)\)s/g, (_, name) => String(values[name])));
// A translated format with named values: tr(gettext("%(n)s files"), { n: 3 }).
export const tr = (format, values) => interpolate(format, values, true);
// The page's language (<html lang>: "en", "zh-hant"), for dates and numbers.
export const LANG = document.documentElement.lang || undefined;

// An element with a class (or none) and text content (never HTML).
export function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
