// The drawing page: draw or drop a digit, POST it to /predict?debug=1 (pinned to the model version
// picked, if any), show what the model thinks; or ask every loaded version at once (/predict/compare).
// After an answer, "Right" / "it was: 0-9" send the truth back (POST /feedback, by the answer's
// X-Request-ID; a request the server did not capture is sent as a labelled example with its picture).
// Plain JS with no build step and no third-party code, so the page works offline and under a
// CSP that allows only 'self'.
"use strict";

(() => {
  const LINE_WIDTH = 20; // about an MNIST stroke once the 280 px canvas is scaled to 28 px
  const LIVE_DELAY_MS = 300; // wait for the pause after a stroke, not every stroke of a digit
  const KEY_STORAGE = "mnist-api-key";
  const VERSIONS_REFRESH_MS = 10_000; // versions come and go as the repository changes

  const $ = (id) => document.getElementById(id);
  const canvas = $("draw");
  const ctx = canvas.getContext("2d");
  const dropzone = $("dropzone");
  const fileInput = $("file");
  const live = $("live");
  const keyInput = $("api-key");
  const resultEl = $("result");
  const statusEl = $("status");
  const errorEl = $("error");
  const barsEl = $("bars");
  const seenBox = $("seen-box");
  const seenImg = $("seen");
  const versionSelect = $("version");
  const answeredByEl = $("answered-by");
  const comparisonBox = $("comparison");
  const verdictEl = $("verdict");
  const comparisonRows = $("comparison-table").tBodies[0];
  const feedbackBox = $("feedback");
  const feedbackStatus = $("feedback-status");
  const feedbackButtons = [$("feedback-right"), ...document.querySelectorAll(".feedback-digit")];

  let hasInk = false;
  let uploaded = null; // the file last uploaded, sent as it is until the user draws over it or clears
  let drawing = null; // {id, x, y} of the pointer that is drawing, or null
  let liveTimer = null;
  let inFlight = null; // AbortController of the request whose answer we are waiting for
  let compareInFlight = null; // the same for the comparison, which runs beside a prediction
  let knownVersions = new Map(); // version name -> its /model entry (labels, accuracy), as last read
  let versionsShown = ""; // what the picker lists now: rebuilt only when that changes
  let shown = null; // the answer on screen, for feedback: {requestId, prediction, blob, name}

  // --- canvas -------------------------------------------------------------------------------

  function clearCanvas() {
    // Opaque white, so the PNG looks like what the user saw (the server also accepts transparency).
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#000";
    ctx.fillStyle = "#000";
    ctx.lineWidth = LINE_WIDTH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    hasInk = false;
  }

  // The canvas is 280x280 pixels but CSS may show it smaller (phones): map client to canvas pixels.
  function toCanvas(event) {
    const rect = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * canvas.height) / rect.height,
    };
  }

  function dot(p) {
    ctx.beginPath();
    ctx.arc(p.x, p.y, LINE_WIDTH / 2, 0, 2 * Math.PI);
    ctx.fill();
  }

  function segment(from, to) {
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
  }

  canvas.addEventListener("pointerdown", (event) => {
    if (event.button !== 0 || drawing) return;
    event.preventDefault();
    // Capture keeps the stroke ours when the pointer leaves the canvas mid-line.
    canvas.setPointerCapture(event.pointerId);
    clearTimeout(liveTimer);
    const p = toCanvas(event);
    drawing = { id: event.pointerId, ...p };
    uploaded = null; // drawing over an upload makes the canvas the input
    hideComparison(); // it was about the picture before this stroke
    dot(p); // a tap is a dot, not nothing
    hasInk = true;
  });

  canvas.addEventListener("pointermove", (event) => {
    if (!drawing || event.pointerId !== drawing.id) return;
    // Coalesced events are the points the browser merged into this one: a fast stroke stays smooth.
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) {
      const p = toCanvas(e);
      segment(drawing, p);
      drawing.x = p.x;
      drawing.y = p.y;
    }
  });

  function endStroke(event) {
    if (!drawing || event.pointerId !== drawing.id) return;
    drawing = null;
    if (live.checked) {
      clearTimeout(liveTimer);
      liveTimer = setTimeout(predictCurrent, LIVE_DELAY_MS);
    }
  }
  canvas.addEventListener("pointerup", endStroke);
  canvas.addEventListener("pointercancel", endStroke);

  // --- talking to the server ----------------------------------------------------------------

  function authHeaders() {
    const key = keyInput.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function showError(message) {
    // The last answer's bars and image would look like the answer to this request: drop them.
    resetResult();
    statusEl.textContent = "";
    errorEl.textContent = message;
    errorEl.hidden = false;
  }

  function clearError() {
    errorEl.hidden = true;
    errorEl.textContent = "";
  }

  // The server's errors are JSON {detail, request_id}; say what it said, with the id to quote.
  async function describeFailure(response) {
    let detail = `${response.status} ${response.statusText}`.trim();
    let requestId = response.headers.get("X-Request-ID");
    try {
      const body = await response.json();
      if (typeof body.detail === "string") detail = body.detail;
      else if (body.detail) detail = JSON.stringify(body.detail);
      requestId = body.request_id || requestId;
    } catch {
      // Not JSON (a proxy's error page, say): the status line is all there is.
    }
    let message = `Server error (HTTP ${response.status}): ${detail}`;
    if (response.status === 401) {
      message += " (enter the key under “API key” below the canvas)";
      $("key-box").open = true;
    }
    return requestId ? `${message} [request id ${requestId}]` : message;
  }

  function formWith(blob, filename) {
    const form = new FormData();
    form.append("file", blob, filename);
    return form;
  }

  async function predict(blob, filename) {
    if (inFlight) inFlight.abort(); // only the newest drawing's answer matters
    const controller = new AbortController();
    inFlight = controller;
    const version = versionSelect.value; // "" is the server's default
    statusEl.textContent = version ? `Asking model version ${version}…` : "Asking the model…";
    clearError();
    try {
      const query = version ? `&version=${encodeURIComponent(version)}` : "";
      const response = await fetch(`/predict?debug=1${query}`, {
        method: "POST",
        body: formWith(blob, filename),
        headers: authHeaders(),
        signal: controller.signal,
      });
      if (!response.ok) {
        showError(await describeFailure(response));
        // 404: the picked version is gone; 503: it is loading or unloading. Show what is there now.
        if (response.status === 404 || response.status === 503) refreshVersions();
        return;
      }
      const answer = await response.json();
      showPrediction(answer);
      shown = { requestId: response.headers.get("X-Request-ID"), prediction: answer.prediction, blob, name: filename };
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(`Could not reach the server: ${err.message}. Is it running?`);
    } finally {
      if (inFlight === controller) inFlight = null;
    }
  }

  // The picture the user means: the uploaded file at its full resolution, else the drawing as a PNG.
  // Null (with the reason shown) when there is nothing to send.
  async function currentImage() {
    if (uploaded) return { blob: uploaded, name: uploaded.name || "upload" };
    if (!hasInk) {
      showError("The canvas is empty: draw a digit first.");
      return null;
    }
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    if (!blob) showError("The browser could not export the drawing as PNG.");
    return blob ? { blob, name: "canvas.png" } : null;
  }

  async function predictCurrent() {
    clearTimeout(liveTimer);
    const image = await currentImage();
    if (image) predict(image.blob, image.name);
  }

  async function compare() {
    const image = await currentImage();
    if (!image) return;
    if (compareInFlight) compareInFlight.abort();
    const controller = new AbortController();
    compareInFlight = controller;
    clearError();
    comparisonRows.replaceChildren();
    verdictEl.className = "verdict";
    verdictEl.textContent = "Asking every loaded version…";
    comparisonBox.hidden = false;
    try {
      // The labels shown beside each answer come from /model: read it again alongside.
      const [response] = await Promise.all([
        fetch("/predict/compare", {
          method: "POST",
          body: formWith(image.blob, image.name),
          headers: authHeaders(),
          signal: controller.signal,
        }),
        refreshVersions(),
      ]);
      if (!response.ok) {
        showError(await describeFailure(response));
        return;
      }
      showComparison(await response.json());
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(`Could not reach the server: ${err.message}. Is it running?`);
    } finally {
      if (compareInFlight === controller) compareInFlight = null;
    }
  }

  // --- showing the answer -------------------------------------------------------------------

  function buildBars() {
    for (let digit = 0; digit < 10; digit++) {
      const row = document.createElement("div");
      row.className = "bar";
      row.dataset.digit = String(digit);
      row.innerHTML =
        `<span class="bar-digit">${digit}</span>` +
        '<span class="bar-track"><span class="bar-fill"></span></span>' +
        '<span class="bar-value">–</span>';
      barsEl.appendChild(row);
    }
  }

  function percent(p) {
    return `${(p * 100).toFixed(1)}%`;
  }

  function labelsOf(version) {
    return knownVersions.get(version)?.labels ?? [];
  }

  function showPrediction(answer) {
    statusEl.textContent = "";
    resultEl.textContent = `${answer.prediction} · ${percent(answer.confidence)}`;
    const labels = labelsOf(answer.model_version);
    answeredByEl.textContent =
      `Answered by model version ${answer.model_version}` + (labels.length ? ` (${labels.join(", ")})` : "");
    answer.probabilities.forEach((p, digit) => {
      const row = barsEl.children[digit];
      row.classList.toggle("top", digit === answer.prediction);
      row.querySelector(".bar-fill").style.width = percent(p);
      row.querySelector(".bar-value").textContent = percent(p);
      row.title = `${digit}: ${percent(p)}`;
    });
    if (answer.image_png_base64) {
      seenImg.src = `data:image/png;base64,${answer.image_png_base64}`;
      seenBox.hidden = false;
    }
    resetFeedback();
    feedbackBox.hidden = false;
  }

  function showComparison(answer) {
    const rows = answer.predictions.map((p) => {
      const row = document.createElement("tr");
      row.classList.toggle("default", p.model_version === answer.default_version);
      for (const text of [
        `v${p.model_version}`,
        labelsOf(p.model_version).join(", ") || "–",
        String(p.prediction),
        percent(p.confidence),
      ]) {
        row.appendChild(document.createElement("td")).textContent = text;
      }
      return row;
    });
    comparisonRows.replaceChildren(...rows);
    const count = answer.predictions.length;
    if (count < 2) {
      verdictEl.textContent = "Only one version is loaded: nothing to compare it with.";
    } else if (answer.agree) {
      verdictEl.textContent = `All ${count} versions agree: ${answer.predictions[0].prediction}.`;
    } else {
      const says = answer.predictions.map((p) => `v${p.model_version} says ${p.prediction}`).join(", ");
      verdictEl.textContent = `The versions disagree: ${says}.`;
    }
    verdictEl.className = count < 2 ? "verdict" : `verdict ${answer.agree ? "agree" : "disagree"}`;
  }

  function hideComparison() {
    if (compareInFlight) compareInFlight.abort();
    comparisonBox.hidden = true;
    comparisonRows.replaceChildren();
    verdictEl.textContent = "";
  }

  function resetResult() {
    resultEl.textContent = "";
    answeredByEl.textContent = "";
    hideComparison();
    statusEl.textContent = "Draw a digit to start.";
    clearError();
    for (const row of barsEl.children) {
      row.classList.remove("top");
      row.querySelector(".bar-fill").style.width = "0";
      row.querySelector(".bar-value").textContent = "–";
    }
    seenBox.hidden = true;
    seenImg.removeAttribute("src");
    shown = null;
    resetFeedback();
    feedbackBox.hidden = true;
  }

  // --- feedback: what the digit really was ---------------------------------------------------

  function resetFeedback() {
    for (const button of feedbackButtons) button.setAttribute("aria-pressed", "false");
    feedbackStatus.textContent = "";
    feedbackStatus.classList.remove("failed");
  }

  function postJson(url, body) {
    return fetch(url, {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
  }

  async function sendFeedback(label, button) {
    const answer = shown;
    if (!answer) return;
    for (const b of feedbackButtons) b.disabled = true;
    feedbackStatus.classList.remove("failed");
    feedbackStatus.textContent = "Sending…";
    try {
      let response = await postJson("/feedback", { request_id: answer.requestId, label });
      if (response.status === 404 && answer.blob) {
        // Not captured (the server samples, or keeps nothing): send the picture itself, labelled.
        response = await fetch(`/feedback/examples?label=${label}`, {
          method: "POST",
          body: formWith(answer.blob, answer.name),
          headers: authHeaders(),
        });
      }
      if (answer !== shown) return; // a newer answer is on screen now
      if (!response.ok) {
        feedbackStatus.textContent = await describeFailure(response);
        feedbackStatus.classList.add("failed");
        return;
      }
      const receipt = await response.json();
      // Stored now under this id: a second click changes this label instead of sending the picture again.
      answer.requestId = receipt.request_id;
      answer.blob = null;
      for (const b of feedbackButtons) b.setAttribute("aria-pressed", String(b === button));
      if (receipt.replaced) {
        feedbackStatus.textContent = `Changed to ${label} (it was ${receipt.previous_label}). Thank you!`;
      } else if (receipt.correct) {
        feedbackStatus.textContent = `Thank you: ${label} was right.`;
      } else {
        feedbackStatus.textContent = `Thank you: it was ${label}, not ${receipt.prediction}. It is kept for the next training.`;
      }
    } catch (err) {
      if (answer !== shown) return;
      feedbackStatus.textContent = `Could not reach the server: ${err.message}. Is it running?`;
      feedbackStatus.classList.add("failed");
    } finally {
      for (const b of feedbackButtons) b.disabled = false;
    }
  }

  $("feedback-right").addEventListener("click", (event) => {
    if (shown) sendFeedback(shown.prediction, event.currentTarget);
  });
  for (const button of document.querySelectorAll(".feedback-digit")) {
    button.addEventListener("click", () => sendFeedback(Number(button.dataset.label), button));
  }

  // --- uploads: file input and drag and drop ------------------------------------------------

  // Shows the upload on the canvas (fitted, on white) so the user sees what was sent; the
  // original file is what goes to the server, at its full resolution.
  async function previewOnCanvas(file) {
    clearCanvas();
    try {
      const bitmap = await createImageBitmap(file);
      const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
      const w = bitmap.width * scale;
      const h = bitmap.height * scale;
      ctx.drawImage(bitmap, (canvas.width - w) / 2, (canvas.height - h) / 2, w, h);
      bitmap.close();
      hasInk = true;
    } catch {
      // Not an image the browser can show: the server still says why it can't use it either.
    }
  }

  async function upload(file) {
    if (!file) return;
    hideComparison();
    uploaded = file; // before the preview: Compare clicked meanwhile sends this file, not a blank canvas
    await previewOnCanvas(file);
    predict(file, file.name || "upload");
  }

  fileInput.addEventListener("change", () => {
    upload(fileInput.files[0]);
    fileInput.value = ""; // choosing the same file again must fire "change" again
  });

  dropzone.addEventListener("dragover", (event) => {
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    dropzone.classList.add("dragging");
  });
  dropzone.addEventListener("dragleave", () => dropzone.classList.remove("dragging"));
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("dragging");
    upload(event.dataTransfer.files[0]);
  });
  // A file dropped next to the zone would otherwise replace the page with the image.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  // --- buttons, key, versions, footer -------------------------------------------------------

  $("predict").addEventListener("click", predictCurrent);
  $("compare").addEventListener("click", compare);
  $("clear").addEventListener("click", () => {
    clearTimeout(liveTimer);
    if (inFlight) inFlight.abort();
    uploaded = null;
    clearCanvas();
    resetResult();
  });
  // The answer on screen should be the picked version's: ask it again.
  versionSelect.addEventListener("change", () => {
    if (live.checked && (uploaded || hasInk)) predictCurrent();
  });

  try {
    keyInput.value = localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    // Storage blocked (private mode, policy): the key just isn't remembered.
  }
  keyInput.addEventListener("change", () => {
    try {
      localStorage.setItem(KEY_STORAGE, keyInput.value.trim());
    } catch {
      // As above.
    }
  });

  function versionText(v) {
    const accuracy = typeof v.test_accuracy === "number" ? percent(v.test_accuracy) : null;
    return [`v${v.version}`, ...v.labels, accuracy].filter(Boolean).join(" · ");
  }

  // The picker: the default first (no ?version), then every READY version. A picked version
  // that is gone stays listed as "not loaded" rather than silently becoming another model.
  function showVersions(info) {
    knownVersions = new Map(info.versions.map((v) => [v.version, v]));
    const ready = info.versions.filter((v) => v.state === "READY");
    const picked = versionSelect.value;
    const stable = info.labels.stable === undefined ? "" : "stable: ";
    const options = [[`default (${stable}v${info.model_version})`, ""]];
    for (const v of ready) options.push([versionText(v), v.version]);
    if (picked && !ready.some((v) => v.version === picked)) options.push([`v${picked} · not loaded`, picked]);
    const shown = JSON.stringify(options);
    if (shown !== versionsShown) {
      // Rebuilt only on a change: a rebuild would close the list under a user choosing from it.
      versionSelect.replaceChildren(...options.map(([text, value]) => new Option(text, value)));
      versionSelect.value = picked;
      versionsShown = shown;
    }
    $("model-version").textContent = `v${info.model_version}`;
    $("model-sha").textContent = String(info.version).slice(0, 12);
    $("model-sha").title = info.version;
    $("model-accuracy").textContent = percent(info.test_accuracy);
  }

  // True once /model answered; a failure keeps what the page shows (the next refresh tries again).
  async function refreshVersions() {
    try {
      const response = await fetch("/model", { cache: "no-store" });
      if (!response.ok) return false;
      showVersions(await response.json());
      return true;
    } catch {
      return false;
    }
  }

  async function loadModelInfo(attempt = 0) {
    if (await refreshVersions()) return;
    // 503 while the model loads: try again a few times before giving up on the footer.
    if (attempt < 5) setTimeout(() => loadModelInfo(attempt + 1), 2000);
    else $("model-version").textContent = "unavailable";
  }

  clearCanvas();
  buildBars();
  loadModelInfo();
  setInterval(() => {
    if (!document.hidden) refreshVersions();
  }, VERSIONS_REFRESH_MS);
  window.addEventListener("focus", refreshVersions);
})();
