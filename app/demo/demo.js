// The demo page: photos in (file input, drag and drop, paste), /predict's answers out.
// No framework, nothing fetched from elsewhere; the API key lives in this variable only.
"use strict";

const TOP_K = 5;
let info = null;

function $(id) { return document.getElementById(id); }

function percent(score) { return (100 * score).toFixed(1) + "%"; }

function megabytes(bytes) { return (bytes / 1024 / 1024).toFixed(0) + " MB"; }

function explain(status, body) {
  // The API's JSON error shape: {"error": "...", "status": 415, "code": "..."}.
  const detail = body && typeof body.error === "string" ? body.error : "";
  if (status === 415) return "Not an image: " + detail;
  if (status === 413) {
    const limit = info ? " the limit is " + megabytes(info.limits.max_upload_bytes) : "";
    return "Too large:" + limit + " (" + detail + ")";
  }
  if (status === 400) return "Cannot read this image: " + detail;
  if (status === 401) return "The API key is missing or wrong.";
  if (status === 503) return "The service is busy or starting; try again in a moment.";
  if (status === 504) return "The service took too long to answer.";
  return "Error " + status + (detail ? ": " + detail : "");
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function loadInfo() {
  try {
    const response = await fetch("/model-info");
    if (!response.ok) throw new Error(explain(response.status, await response.json()));
    info = await response.json();
    const top1 = info.metrics && info.metrics.validation_top1;
    const accuracy = typeof top1 === "number"
      ? ", " + percent(top1) + " top-1 on " + info.evaluated_on.images + " validation photos"
      : "";
    $("model").textContent = info.name + " " + info.version + " (" + info.variant + ", "
      + info.input.height + " px" + accuracy + "). Labels: " + info.labels.join(", ") + ".";
    $("key-row").hidden = !info.auth_required;
  } catch (error) {
    $("model").textContent = "Model details unavailable: " + error.message;
  }
}

function card(file) {
  const item = document.createElement("li");
  item.className = "result";
  const image = document.createElement("img");
  image.alt = "Photo " + file.name;
  image.src = URL.createObjectURL(file);
  image.addEventListener("load", () => URL.revokeObjectURL(image.src), { once: true });
  image.addEventListener("error", () => { image.hidden = true; }, { once: true });
  const body = document.createElement("div");
  body.className = "body";
  const name = document.createElement("p");
  name.className = "name";
  name.textContent = file.name || "pasted image";
  const state = document.createElement("p");
  state.className = "muted";
  state.textContent = "Classifying…";
  body.append(name, state);
  item.append(image, body);
  return { item, body, state };
}

function showScores(view, prediction, timings) {
  const list = document.createElement("ul");
  list.className = "scores";
  list.setAttribute("aria-label", "Top labels");
  for (const entry of prediction.top_k) {
    const row = document.createElement("li");
    const label = document.createElement("span");
    label.textContent = entry.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = percent(entry.score);
    bar.append(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = percent(entry.score);
    row.append(label, bar, pct);
    list.append(row);
  }
  view.state.textContent = prediction.label + " (" + percent(prediction.score) + "), "
    + timings.total.toFixed(1) + " ms on the server";
  view.state.className = "verdict";
  view.body.append(list);
}

async function classify(file) {
  const view = card(file);
  $("results").prepend(view.item);
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  try {
    const response = await fetch("/predict?top_k=" + TOP_K, {
      method: "POST", body: form, headers: headers(),
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new Error(explain(response.status, body));
    showScores(view, body.predictions[0], body.timings_ms);
    return true;
  } catch (error) {
    view.state.textContent = error.message;
    view.state.className = "error";
    return false;
  }
}

async function classifyAll(files) {
  const list = Array.from(files);
  if (!list.length) return;
  $("status").textContent = "Classifying " + list.length + " photo(s)…";
  const results = await Promise.all(list.map(classify));
  const failed = results.filter((ok) => !ok).length;
  $("status").textContent = "Done: " + (list.length - failed) + " classified"
    + (failed ? ", " + failed + " failed" : "") + ".";
}

document.addEventListener("DOMContentLoaded", () => {
  loadInfo();
  const input = $("files");
  input.addEventListener("change", () => { classifyAll(input.files); input.value = ""; });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("dragging"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    classifyAll(event.dataTransfer.files);
  });
  document.addEventListener("paste", (event) => {
    const files = event.clipboardData ? event.clipboardData.files : [];
    if (files.length) classifyAll(files);
  });
});
