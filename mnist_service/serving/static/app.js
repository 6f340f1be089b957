// The drawing page: draw or drop a digit, POST it to /predict?debug=1, show what the model thinks.
// Plain JS with no build step and no third-party code, so the page works offline and under a
// CSP that allows only 'self'.
"use strict";

(() => {
  const LINE_WIDTH = 20; // about an MNIST stroke once the 280 px canvas is scaled to 28 px
  const LIVE_DELAY_MS = 300; // wait for the pause after a stroke, not every stroke of a digit
  const KEY_STORAGE = "mnist-api-key";

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

  let hasInk = false;
  let drawing = null; // {id, x, y} of the pointer that is drawing, or null
  let liveTimer = null;
  let inFlight = null; // AbortController of the request whose answer we are waiting for

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
      liveTimer = setTimeout(predictCanvas, LIVE_DELAY_MS);
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

  async function predict(blob, filename) {
    if (inFlight) inFlight.abort(); // only the newest drawing's answer matters
    const controller = new AbortController();
    inFlight = controller;
    const form = new FormData();
    form.append("file", blob, filename);
    statusEl.textContent = "Asking the model…";
    clearError();
    try {
      const response = await fetch("/predict?debug=1", {
        method: "POST",
        body: form,
        headers: authHeaders(),
        signal: controller.signal,
      });
      if (!response.ok) {
        showError(await describeFailure(response));
        return;
      }
      showPrediction(await response.json());
    } catch (err) {
      if (err.name === "AbortError") return;
      showError(`Could not reach the server: ${err.message}. Is it running?`);
    } finally {
      if (inFlight === controller) inFlight = null;
    }
  }

  function predictCanvas() {
    clearTimeout(liveTimer);
    if (!hasInk) {
      showError("The canvas is empty: draw a digit first.");
      return;
    }
    canvas.toBlob((blob) => {
      if (blob) predict(blob, "canvas.png");
      else showError("The browser could not export the drawing as PNG.");
    }, "image/png");
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

  function showPrediction(answer) {
    statusEl.textContent = "";
    resultEl.textContent = `${answer.prediction} · ${percent(answer.confidence)}`;
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
  }

  function resetResult() {
    resultEl.textContent = "";
    statusEl.textContent = "Draw a digit to start.";
    clearError();
    for (const row of barsEl.children) {
      row.classList.remove("top");
      row.querySelector(".bar-fill").style.width = "0";
      row.querySelector(".bar-value").textContent = "–";
    }
    seenBox.hidden = true;
    seenImg.removeAttribute("src");
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

  // --- buttons, key, footer -----------------------------------------------------------------

  $("predict").addEventListener("click", predictCanvas);
  $("clear").addEventListener("click", () => {
    clearTimeout(liveTimer);
    if (inFlight) inFlight.abort();
    clearCanvas();
    resetResult();
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

  async function loadModelInfo(attempt = 0) {
    try {
      const response = await fetch("/model");
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const info = await response.json();
      $("model-version").textContent = String(info.version).slice(0, 12);
      $("model-version").title = info.version;
      $("model-accuracy").textContent = percent(info.test_accuracy);
    } catch {
      // 503 while the model loads: try again a few times before giving up on the footer.
      if (attempt < 5) setTimeout(() => loadModelInfo(attempt + 1), 2000);
      else $("model-version").textContent = "unavailable";
    }
  }

  clearCanvas();
  buildBars();
  loadModelInfo();
})();
