// mien's page: pick a model, send a photo or camera frames to POST /predict, draw what comes back.
// Plain browser JavaScript, no dependencies; every request goes to the server that served this page.
"use strict";

(() => {
  const MIN_FRAME_INTERVAL_MS = 250; // camera: at most 4 frames a second...
  const MAX_FRAME_SIDE = 640; // ...each scaled to at most this many pixels on its longer side
  const COLORS = ["#e4572e", "#29a3a3", "#f3a712", "#6a4c93", "#1982c4", "#8ac926"];

  const $ = (id) => document.getElementById(id);
  const modelSelect = $("model-select");
  const keyField = $("key-field");
  const keyInput = $("api-key");
  const fileInput = $("file-input");
  const dropZone = $("drop-zone");
  const cameraButton = $("camera-button");
  const stage = $("stage");
  const placeholder = $("placeholder");
  const photo = $("photo");
  const video = $("video");
  const overlay = $("overlay");
  const statusLine = $("status");
  const errorLine = $("error");
  const answer = $("answer");
  const facesBox = $("faces");

  // What the page is showing, and counters a test (or a curious person) can read from window.mien.
  const state = {
    mode: "empty", // "empty" | "photo" | "camera"
    file: null, // the last photo, re-sent when the model changes
    photoUrl: null,
    stream: null,
    inFlight: 0,
    timer: null,
    lastFrameAt: 0,
    boxes: { faces: [], scale: 1 }, // the last answer's, redrawn when the overlay is resized
  };
  const stats = { requests: 0, maxInFlight: 0, framesSent: 0, answers: 0, frameTimes: [] };
  window.mien = { state, stats };

  // ---- messages ---------------------------------------------------------------------------------

  function setStatus(text) {
    if (statusLine.textContent !== text) statusLine.textContent = text; // unchanged: nothing re-announced
  }

  function showError(text) {
    errorLine.textContent = text;
    errorLine.hidden = false;
  }

  function clearError() {
    errorLine.hidden = true;
    errorLine.textContent = "";
  }

  // ---- models -------------------------------------------------------------------------------------

  async function loadModels() {
    try {
      const response = await fetch("models", { headers: { Accept: "application/json" } });
      const body = await readJson(response);
      if (!response.ok) throw new Error(errorMessage(body, response));
      modelSelect.textContent = "";
      for (const model of body.models) {
        const option = document.createElement("option");
        option.value = model.id;
        const accuracy = model.accuracy == null ? "" : ` (${(100 * model.accuracy).toFixed(1)}% accuracy)`;
        option.textContent = model.id + accuracy;
        option.selected = model.id === body.default;
        modelSelect.append(option);
      }
      modelSelect.disabled = false;
      setStatus("Choose a photo or start the camera.");
    } catch (err) {
      setStatus("The models could not be listed.");
      showError(`GET /models failed: ${err.message}`);
    }
  }

  // The API key (only when the service sets MIEN_API_KEY): asked for after a 401, kept in this page only.
  function askForKey() {
    keyField.hidden = false;
    keyInput.focus();
  }

  keyInput.addEventListener("change", () => {
    if (state.mode === "photo" && state.file) sendPhoto(state.file);
  });

  modelSelect.addEventListener("change", () => {
    if (state.mode === "photo" && state.file) sendPhoto(state.file);
    // camera mode: the next frame goes to the new model by itself
  });

  // ---- talking to /predict ----------------------------------------------------------------------

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }

  function errorMessage(body, response) {
    if (body && body.error && body.error.message) return body.error.message;
    return `the server answered ${response.status} ${response.statusText}`.trim();
  }

  // One POST /predict; resolves to {ok, body, message, roundTripMs}. Never throws.
  async function predict(blob, filename) {
    const form = new FormData();
    form.append("file", blob, filename);
    const url = "predict?model=" + encodeURIComponent(modelSelect.value);
    state.inFlight += 1;
    stats.requests += 1;
    stats.maxInFlight = Math.max(stats.maxInFlight, state.inFlight);
    const started = performance.now();
    try {
      const headers = keyInput.value ? { "X-API-Key": keyInput.value } : {};
      const response = await fetch(url, { method: "POST", body: form, headers });
      const body = await readJson(response);
      const roundTripMs = performance.now() - started;
      if (response.status === 401) askForKey();
      if (!response.ok) return { ok: false, message: errorMessage(body, response), roundTripMs };
      return { ok: true, body, roundTripMs };
    } catch (err) {
      return { ok: false, message: `could not reach the server (${err.message})` };
    } finally {
      state.inFlight -= 1;
    }
  }

  // ---- showing an answer --------------------------------------------------------------------------

  function showAnswer(result, scale) {
    stats.answers += 1;
    if (!result.ok) {
      clearFaces();
      showError(result.message);
      setStatus("The server could not read that.");
      return;
    }
    clearError();
    const body = result.body;
    window.mien.lastAnswer = body;
    $("answer-model").textContent = body.model;
    $("answer-provider").textContent = body.provider;
    $("answer-latency").textContent =
      `${Math.round(body.timings_ms.total)} ms on the server, ${Math.round(result.roundTripMs)} ms round trip`;
    answer.hidden = false;
    drawBoxes(body.faces, scale);
    renderFaces(body.faces);
    const n = body.faces.length;
    if (n === 0) {
      setStatus(state.mode === "camera" ? "No face found in the camera picture." : "No face found in this picture.");
    } else {
      setStatus(n === 1 ? `1 face: ${shownLabel(body.faces[0])}.` : `${n} faces.`);
    }
  }

  function clearFaces() {
    facesBox.textContent = "";
    const ctx = overlay.getContext("2d");
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    overlay.dataset.boxes = "0";
    stage.dataset.faces = "0";
    state.boxes = { faces: [], scale: 1 };
  }

  // With min_confidence set, a face below it has no label (`uncertain: true`), but all its probabilities.
  function shownLabel(face) {
    return face.uncertain ? "not sure" : face.label;
  }

  function percent(p) {
    return `${(100 * p).toFixed(1)}%`;
  }

  // Boxes come in the pixels of the image the server decoded; `scale` maps them onto the overlay.
  function drawBoxes(faces, scale) {
    state.boxes = { faces, scale };
    const ctx = overlay.getContext("2d");
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    const line = Math.max(2, Math.round(Math.max(overlay.width, overlay.height) / 250));
    const fontSize = Math.max(12, Math.round(Math.max(overlay.width, overlay.height) / 28));
    ctx.font = `bold ${fontSize}px system-ui, sans-serif`;
    ctx.textBaseline = "top";
    faces.forEach((face, i) => {
      const color = COLORS[i % COLORS.length];
      const x = face.box.x * scale;
      const y = face.box.y * scale;
      const w = face.box.width * scale;
      const h = face.box.height * scale;
      ctx.lineWidth = line;
      ctx.strokeStyle = color;
      ctx.strokeRect(x, y, w, h);
      const text = `${i + 1}. ${shownLabel(face)} ${Math.round(100 * face.score)}%`;
      const pad = Math.round(fontSize / 4);
      const textWidth = ctx.measureText(text).width + 2 * pad;
      const textHeight = fontSize + 2 * pad;
      const ty = y - textHeight >= 0 ? y - textHeight : y + h; // above the box, else below it
      ctx.fillStyle = color;
      ctx.fillRect(x - line / 2, ty, textWidth, textHeight);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x - line / 2 + pad, ty + pad);
    });
    overlay.dataset.boxes = String(faces.length);
    stage.dataset.faces = String(faces.length);
  }

  function renderFaces(faces) {
    facesBox.textContent = "";
    faces.forEach((face, i) => {
      const card = document.createElement("section");
      card.className = "face";
      card.dataset.testid = "face-card";
      card.dataset.label = shownLabel(face);
      card.style.setProperty("--face-color", COLORS[i % COLORS.length]);
      const title = document.createElement("h2");
      title.append(`Face ${i + 1}: `);
      const top = document.createElement("strong");
      top.className = "top-label";
      top.dataset.testid = "top-label";
      top.textContent = shownLabel(face);
      title.append(top, ` ${percent(face.score)}`);
      card.append(title);

      const list = document.createElement("ul");
      list.className = "bars";
      list.setAttribute("aria-label", `probabilities of face ${i + 1}`);
      for (const [label, p] of Object.entries(face.probabilities)) {
        const item = document.createElement("li");
        item.className = label === face.label ? "bar best" : "bar";
        item.dataset.testid = "bar";
        item.dataset.label = label;
        item.dataset.value = String(p);
        const name = document.createElement("span");
        name.className = "name";
        name.textContent = label;
        const track = document.createElement("span");
        track.className = "track";
        track.setAttribute("aria-hidden", "true");
        const fill = document.createElement("span");
        fill.className = "fill";
        fill.style.width = `${Math.min(100, Math.max(0, 100 * p)).toFixed(1)}%`;
        track.append(fill);
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = percent(p);
        item.append(name, track, value);
        list.append(item);
      }
      card.append(list);
      facesBox.append(card);
    });
  }

  // ---- photos -------------------------------------------------------------------------------------

  function showMode(mode) {
    state.mode = mode;
    stage.dataset.mode = mode;
    placeholder.hidden = mode !== "empty";
    placeholder.textContent = "No picture yet.";
    photo.hidden = mode !== "photo";
    video.hidden = mode !== "camera";
  }

  async function sendPhoto(file) {
    clearError();
    setStatus(`Sending ${file.name || "the photo"} to ${modelSelect.value}…`);
    const result = await predict(file, file.name || "photo");
    if (state.mode !== "photo" || state.file !== file) return; // another photo or the camera took over
    showAnswer(result, 1);
  }

  function usePhoto(file) {
    if (!file) return;
    stopCamera();
    state.file = file;
    if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
    state.photoUrl = URL.createObjectURL(file);
    clearFaces();
    answer.hidden = true;
    showMode("photo");
    photo.alt = `the uploaded photo ${file.name || ""}`.trim();
    photo.onload = () => {
      overlay.width = photo.naturalWidth;
      overlay.height = photo.naturalHeight;
      drawBoxes(state.boxes.faces, state.boxes.scale); // the answer may have come before the picture
    };
    photo.onerror = () => {
      // Not a picture the browser can show; the server's answer says what it thinks of it.
      photo.hidden = true;
      placeholder.textContent = `${file.name || "This file"} is not a picture this browser can show.`;
      placeholder.hidden = false;
    };
    photo.src = state.photoUrl;
    sendPhoto(file);
  }

  fileInput.addEventListener("change", () => {
    usePhoto(fileInput.files[0]);
    fileInput.value = ""; // choosing the same file again still sends it
  });

  for (const type of ["dragenter", "dragover"]) {
    dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const file = event.dataTransfer && event.dataTransfer.files[0];
    if (file) usePhoto(file);
  });
  // A photo dropped anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  // ---- camera -------------------------------------------------------------------------------------

  async function startCamera() {
    clearError();
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("This browser offers no camera here (a camera needs https or localhost).");
      return;
    }
    try {
      setStatus("Asking for the camera…");
      state.stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    } catch (err) {
      setStatus("The camera is off.");
      showError(`The camera could not start: ${err.message || err.name}`);
      return;
    }
    state.file = null;
    clearFaces();
    answer.hidden = true;
    showMode("camera");
    video.srcObject = state.stream;
    await video.play().catch(() => {});
    cameraButton.textContent = "Stop camera";
    cameraButton.setAttribute("aria-pressed", "true");
    setStatus("Camera on: looking for faces…");
    scheduleFrame(0);
  }

  function stopCamera() {
    if (!state.stream) return;
    clearTimeout(state.timer);
    state.timer = null;
    for (const track of state.stream.getTracks()) track.stop();
    state.stream = null;
    video.srcObject = null;
    cameraButton.textContent = "Start camera";
    cameraButton.setAttribute("aria-pressed", "false");
    if (state.mode === "camera") {
      clearFaces();
      showMode("empty");
      setStatus("Camera off.");
    }
  }

  function scheduleFrame(delay) {
    clearTimeout(state.timer);
    state.timer = setTimeout(sendFrame, Math.max(0, delay));
  }

  // One frame at a time: the next is scheduled only once this one's answer is in, and no sooner than
  // MIN_FRAME_INTERVAL_MS after the previous one left. A slow server slows the frames; nothing queues.
  async function sendFrame() {
    state.timer = null;
    if (state.mode !== "camera" || !state.stream || state.inFlight > 0) return;
    if (!video.videoWidth || !video.videoHeight) {
      scheduleFrame(100); // no picture yet
      return;
    }
    const scale = Math.min(1, MAX_FRAME_SIDE / Math.max(video.videoWidth, video.videoHeight));
    const frame = document.createElement("canvas");
    frame.width = Math.round(video.videoWidth * scale);
    frame.height = Math.round(video.videoHeight * scale);
    frame.getContext("2d").drawImage(video, 0, 0, frame.width, frame.height);
    const blob = await new Promise((resolve) => frame.toBlob(resolve, "image/jpeg", 0.85));
    if (!blob || state.mode !== "camera") {
      if (state.mode === "camera") scheduleFrame(MIN_FRAME_INTERVAL_MS);
      return;
    }
    state.lastFrameAt = performance.now();
    stats.framesSent += 1;
    stats.frameTimes.push(state.lastFrameAt);
    if (stats.frameTimes.length > 100) stats.frameTimes.shift();
    const result = await predict(blob, "frame.jpg");
    if (state.mode !== "camera" || !state.stream) return; // stopped while the frame was out
    overlay.width = video.videoWidth;
    overlay.height = video.videoHeight;
    showAnswer(result, 1 / scale);
    scheduleFrame(state.lastFrameAt + MIN_FRAME_INTERVAL_MS - performance.now());
  }

  cameraButton.addEventListener("click", () => {
    if (state.stream) stopCamera();
    else startCamera();
  });

  loadModels();
})();
