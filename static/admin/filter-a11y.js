// Django's filter_horizontal widget (admin/js/SelectFilter2.js) names its two
// search icons with aria-label on a <span> without a role, which ARIA does not
// allow (axe: aria-prohibited-attr, serious). Give them the role they play, an
// image named by that label. The widget draws itself on "load"; this listener,
// added after the form's media, runs after it.
"use strict";

window.addEventListener("load", () => {
  for (const icon of document.querySelectorAll(".search-label-icon[aria-label]:not([role])")) {
    icon.setAttribute("role", "img");
  }
});
