// Progressive enhancement: without this script the forms POST and the server
// redirects back (303). With it, the same forms update the numbers in place.
"use strict";

const status = document.getElementById("status");

// Each number's requests go one after another. Two quick clicks sent at once
// could be answered out of order, and the older answer, shown last, would hide
// the newer count (the server still holds every click; the page would not).
const queues = new Map();

function submit(event) {
  event.preventDefault();
  const form = event.target;
  const button = event.submitter;
  // Read the form now: the step may change before this click's turn comes.
  const action = (button && button.getAttribute("formaction")) || form.getAttribute("action");
  const body = new URLSearchParams(new FormData(form));
  const target = document.getElementById(form.dataset.update);
  const previous = queues.get(target) || Promise.resolve();
  const next = previous.then(() => send(action, body, target));
  queues.set(target, next);
}

async function send(action, body, target) {
  try {
    const response = await fetch(action, {
      method: "POST",
      body,
      headers: { Accept: "application/json" },
      credentials: "same-origin",
    });
    const text = await response.text();
    if (!response.ok) {
      status.textContent = JSON.parse(text).error || `Error ${response.status}`;
      return;
    }
    // Read the number from the text: JSON.parse would round 64-bit counts.
    const value = text.match(/:\s*(-?\d+)/);
    status.textContent = "";
    target.textContent = value ? value[1] : target.textContent;
  } catch (error) {
    status.textContent = "The server could not be reached. Reload to see the current count.";
  }
}

for (const form of document.querySelectorAll("form[data-update]")) {
  form.addEventListener("submit", submit);
}

// Keep the buttons saying what they will do: "+5" and "−5" for a step of 5,
// and for a step of -5 the first button subtracts, so it reads "−5".
const step = document.getElementById("by");
function signed(text, negate) {
  const negative = text.startsWith("-") !== negate;
  const digits = text.replace(/^[-+]/, "") || "1";
  return `${negative ? "\u2212" : "+"}${digits}`;
}
step.addEventListener("input", () => {
  const text = /^[-+]?\d+$/.test(step.value.trim()) ? step.value.trim() : "1";
  document.getElementById("plus").textContent = signed(text, false);
  document.getElementById("minus").textContent = signed(text, true);
});
