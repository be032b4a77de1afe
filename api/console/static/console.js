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

// The review page: save (answer, rating, star) and go on to the next task, keyboard first; bulk stars on the queue.
async function postJSON(url, body) {
  const response = await fetch(url, {method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error((answer.error && answer.error.message) || `HTTP ${response.status}`);
  return answer;
}

function reviewPage(root) {
  const form = root.querySelector("#review-form");
  const status = root.querySelector("#review-status");
  const say = (text, bad) => { if (status) { status.textContent = text; status.classList.toggle("error", !!bad); } };
  const go = (url) => { if (url) window.location.assign(url); };
  if (form) {
    const answer = form.querySelector("#answer");
    const star = form.querySelector("#gold-star");
    const save = async () => {
      const body = {gold_star: star.checked};
      if (answer.value.trim() && answer.value !== answer.dataset.original) body.response = answer.value;
      const rating = form.querySelector("input[name=rating]:checked");
      if (rating) body.rating = Number(rating.value);
      say("Saving…");
      try {
        await postJSON(`/ui/review/tasks/${form.dataset.task}`, body);
        say("Saved.");
        if (form.dataset.next) go(form.dataset.next); else window.location.reload();
      } catch (error) {
        say(`Not saved: ${error.message}`, true);
      }
    };
    form.addEventListener("submit", (event) => { event.preventDefault(); save(); });
    form.querySelector("#skip").addEventListener("click", () => go(form.dataset.next));
    form.querySelector("#previous").addEventListener("click", () => go(form.dataset.previous));
    document.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); save(); return; }
      const typing = ["TEXTAREA", "INPUT", "SELECT"].includes(document.activeElement.tagName)
        && document.activeElement.type !== "radio" && document.activeElement.type !== "checkbox";
      if (event.key === "Escape" && typing) { document.activeElement.blur(); return; }
      if (typing || event.ctrlKey || event.metaKey || event.altKey) return;
      if (/^[1-5]$/.test(event.key)) {
        form.querySelector(`input[name=rating][value="${event.key}"]`).checked = true;
      } else if (event.key === "g") {
        star.checked = !star.checked;
      } else if (event.key === "e") {
        event.preventDefault(); answer.focus();
      } else if (event.key === "n") {
        go(form.dataset.next);
      } else if (event.key === "p") {
        go(form.dataset.previous);
      }
    });
  }
  for (const button of root.querySelectorAll("[data-bulk]")) {
    button.addEventListener("click", async () => {
      const ids = [...root.querySelectorAll("#queue input[type=checkbox]:checked")].map((box) => Number(box.value));
      if (!ids.length) { say("Select tasks in the queue first.", true); return; }
      try {
        await postJSON("/ui/review/gold-star", {task_ids: ids, gold_star: button.dataset.bulk === "true"});
        window.location.reload();
      } catch (error) {
        say(`Not saved: ${error.message}`, true);
      }
    });
  }
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  document.querySelectorAll("form[data-chat]").forEach(chatBox);
  document.querySelectorAll("[data-refresh]").forEach(refresh);
  document.querySelectorAll("[data-review]").forEach(reviewPage);
});
