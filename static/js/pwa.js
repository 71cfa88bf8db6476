// Registers the service worker that makes BreezeWeb installable (breezeweb/pwa.py).
// A classic script loaded on every page; the worker's URL comes from the tag.
"use strict";

(() => {
  const url = document.currentScript && document.currentScript.dataset.serviceWorker;
  if (!url || !("serviceWorker" in navigator) || !window.isSecureContext) return;
  window.addEventListener("load", () => {
    // A browser that refuses (private mode, policies) simply has no offline shell.
    navigator.serviceWorker.register(url, { scope: "/" }).catch(() => {});
  });
})();
