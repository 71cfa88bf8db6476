{% autoescape off %}// BreezeWeb's service worker (breezeweb/pwa.py renders it). It caches the app
// shell (the site's own CSS, scripts, libraries and icons) so the installed app
// opens at once. It answers nothing else: pages, answers, documents and API
// responses always go to the network, untouched.
const VERSION = "{{ version }}";
const CACHE = `breezeweb-shell-${VERSION}`;
const SHELL = {{ shell_json }};
const SHELL_PATHS = new Set(SHELL);

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches.open(CACHE)
      .then((cache) => cache.addAll(SHELL.map((url) => new Request(url, { cache: "reload" }))))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys()
      .then((keys) => Promise.all(keys
        .filter((key) => key.startsWith("breezeweb-shell-") && key !== CACHE)
        .map((key) => caches.delete(key))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin || url.search || !SHELL_PATHS.has(url.pathname)) return;
  event.respondWith(
    caches.open(CACHE).then(async (cache) => (await cache.match(url.pathname)) || fetch(request)),
  );
});
{% endautoescape %}
