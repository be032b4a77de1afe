// The console's live parts: an element with data-refresh="<url>" is replaced by that URL's HTML every
// data-every milliseconds, until the fragment says its batch has ended. Unix times are shown in local time.
"use strict";
const ENDED = ["completed", "failed", "expired", "cancelled"];

function localTimes(root) {
  for (const cell of root.querySelectorAll("[data-unix]")) {
    const seconds = Number(cell.dataset.unix);
    if (seconds) cell.textContent = new Date(seconds * 1000).toLocaleString();
  }
}

function refresh(element) {
  const every = Number(element.dataset.every || 2000);
  const tick = async () => {
    try {
      const response = await fetch(element.dataset.refresh, {credentials: "same-origin"});
      if (!response.ok) throw new Error(`${response.status}`);
      let html = await response.text();
      if (element.dataset.select) {  // a whole page: keep the part this element shows
        const part = new DOMParser().parseFromString(html, "text/html").querySelector(element.dataset.select);
        if (part) html = part.outerHTML;
      }
      element.innerHTML = html;
      localTimes(element);
      const status = element.querySelector("[data-status]");
      if (status && ENDED.includes(status.dataset.status)) return;
    } catch (error) {
      element.dataset.stale = "true";  // shown greyed out; tried again
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  document.querySelectorAll("[data-refresh]").forEach(refresh);
});
