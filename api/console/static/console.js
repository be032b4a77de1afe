// The console's live parts: an element with data-refresh="<url>" is replaced by that URL's HTML every
// data-every milliseconds, until the fragment says its batch or job has ended. Unix times are shown in local time.
"use strict";
const ENDED = ["completed", "succeeded", "failed", "expired", "cancelled"];

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

// The try-it box: the answer is streamed in as the model writes it (the chat route's server-sent events).
function chatBox(form) {
  const output = form.querySelector("#chat-output");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    output.textContent = "";
    output.classList.remove("error");
    const body = {model: form.querySelector("#chat-model").value, content: form.querySelector("#chat-input").value,
                  temperature: Number(form.querySelector("#chat-temperature").value || 0.7)};
    try {
      const response = await fetch(form.dataset.chat, {method: "POST", credentials: "same-origin",
        headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
      if (!response.ok) {
        const failure = await response.json().catch(() => ({}));
        throw new Error((failure.error && failure.error.message) || `HTTP ${response.status}`);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let pending = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        pending += decoder.decode(value, {stream: true});
        const lines = pending.split("\n");
        pending = lines.pop();
        for (const line of lines) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) output.textContent += delta.content;
        }
      }
    } catch (error) {
      output.textContent = `Could not get an answer: ${error.message}`;
      output.classList.add("error");
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  document.querySelectorAll("form[data-chat]").forEach(chatBox);
  document.querySelectorAll("[data-refresh]").forEach(refresh);
});
