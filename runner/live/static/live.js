// turbo-trt live: the page's client of the /ws protocol (README, "Real time" > "turbo-trt live"). No
// dependencies.
//
// At most one input is in flight: the next camera frame, prompt or upload is sent when the last input's
// result (or its error: an error message with "input": true) arrives, so the server never queues stale work
// for this page and the display follows the newest settings. Text-to-image is asked for explicitly
// ("generate": true); settings alone start nothing. A reply that never comes (REPLY_TIMEOUT_MS) frees the
// slot so the page does not stall.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = {
    prompt: $("prompt"), seed: $("seed"), steps: $("steps"), strength: $("strength"),
    strengthValue: $("strength-value"), camera: $("camera"), upload: $("upload"), output: $("output"),
    preview: $("preview"), stats: $("stats"), status: $("status"), error: $("error"),
    controlBox: $("control-box"), control: $("control"), controlScale: $("control-scale"),
    controlScaleValue: $("control-scale-value"),
  };
  const REPLY_TIMEOUT_MS = 30000;
  const canvas = document.createElement("canvas");
  const state = {
    config: null, ws: null, mode: "text", inFlight: 0, sentAt: 0, dirty: true, sent: {}, grabbing: false,
    uploadBlob: null, meta: null, dropped: 0, results: 0, outputUrl: null, media: null,
    retry: 500,
  };

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = !text;
  }

  function settings() {
    const seed = Number(el.seed.value), steps = Number(el.steps.value), strength = Number(el.strength.value);
    const maxSteps = state.config ? state.config.max_steps : 4;
    if (!Number.isInteger(seed) || seed < 0) return showError("Seed must be a whole number ≥ 0."), null;
    if (!Number.isInteger(steps) || steps < 1 || steps > maxSteps) {
      return showError(`Steps must be a whole number from 1 to ${maxSteps}.`), null;
    }
    if (state.mode !== "text" && Math.floor(steps * strength + 1e-9) < 1) {
      return showError("Strength × steps must reach one step: raise the strength or the steps."), null;
    }
    const values = { prompt: el.prompt.value, seed, steps, strength };
    if (state.config && state.config.controlnets > 0) {  // ControlNet bundles only: others refuse a scale
      values.control = el.control.value;
      values.control_scale = Number(el.controlScale.value);
    }
    return values;
  }

  function changes(wanted) {
    const out = {};
    for (const [key, value] of Object.entries(wanted)) if (state.sent[key] !== value) out[key] = value;
    return out;
  }

  function sendSettings(values) {
    if (Object.keys(values).length === 0) return;
    state.ws.send(JSON.stringify(values));
    Object.assign(state.sent, values);
  }

  function sendFrame(blob) {
    state.ws.send(blob);
    state.inFlight += 1;
    state.sentAt = performance.now();
  }

  // Sends the changed settings, then a frame that uses them.
  function sendWithFrame(blob, wanted) {
    sendSettings(changes(wanted));
    sendFrame(blob);
  }

  function grabFrame() {
    const video = el.preview;
    const { width, height } = state.config;
    const scale = Math.min(video.videoWidth / width, video.videoHeight / height);
    const sw = width * scale, sh = height * scale;
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(video, (video.videoWidth - sw) / 2, (video.videoHeight - sh) / 2, sw, sh, 0, 0, width, height);
    return new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
  }

  async function pump() {
    const ws = state.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !state.config || state.inFlight > 0 || state.grabbing) return;
    const wanted = settings();
    if (!wanted) return;
    showError("");
    if (state.mode === "camera") {
      if (!state.media || el.preview.videoWidth === 0) return;
      state.grabbing = true;
      try {
        const blob = await grabFrame();
        if (blob && state.mode === "camera" && ws.readyState === WebSocket.OPEN) sendWithFrame(blob, wanted);
      } finally {
        state.grabbing = false;
      }
      state.dirty = false;
    } else if (state.mode === "upload") {
      if (!state.uploadBlob || !state.dirty) return;
      sendWithFrame(state.uploadBlob, wanted);
      state.dirty = false;
    } else {
      if (!state.dirty || wanted.prompt.trim() === "") return;
      state.ws.send(JSON.stringify({ ...changes(wanted), prompt: wanted.prompt, generate: true }));  // text to image
      Object.assign(state.sent, wanted);
      state.inFlight += 1;
      state.sentAt = performance.now();
      state.dirty = false;
    }
  }

  function showResult(blob) {
    const meta = state.meta || {};
    state.meta = null;
    const type = state.sent.format === "png" ? "image/png" : "image/jpeg";
    const url = URL.createObjectURL(new Blob([blob], { type }));
    el.output.src = url;
    if (state.outputUrl) URL.revokeObjectURL(state.outputUrl);
    state.outputUrl = url;
    state.results += 1;
    const rtt = performance.now() - state.sentAt;
    const fps = typeof meta.fps === "number" ? meta.fps : 0;
    el.stats.textContent = `${fps.toFixed(1)} fps · ${Number(meta.latency_ms || 0).toFixed(0)} ms server · ` +
      `${rtt.toFixed(0)} ms round trip · dropped ${meta.dropped || 0}` + (meta.skipped ? " · skipped" : "");
    el.stats.dataset.fps = String(fps);
    el.stats.dataset.results = String(state.results);
    el.output.dataset.seq = String(meta.seq);
  }

  function settle(count) {
    state.inFlight = Math.max(0, state.inFlight - count);
  }

  function onMessage(event) {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if ("error" in msg) {
        showError(msg.error);
        if (msg.input) {  // an input that queued nothing, or one the engines failed on: its slot is free
          settle(1);
          setTimeout(pump, 0);
        } else {
          state.sent = {};  // a settings-only error: the server kept its old settings; send them all again
        }
        return;
      }
      if (typeof msg.dropped === "number" && msg.dropped > state.dropped) {
        settle(msg.dropped - state.dropped);  // inputs the server replaced with newer ones: never answered
        state.dropped = msg.dropped;
      }
      state.meta = msg;
      return;
    }
    showResult(event.data);
    settle(1);
    pump();
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws`);
    ws.binaryType = "blob";
    state.ws = ws;
    ws.onopen = () => {
      el.status.textContent = `connected · ${state.config.width}×${state.config.height}`;
      document.body.dataset.state = "ready";
      Object.assign(state, { inFlight: 0, sent: {}, dirty: true, dropped: 0, retry: 500 });
      pump();
    };
    ws.onmessage = onMessage;
    ws.onclose = (event) => {
      document.body.dataset.state = "closed";
      const why = event.code === 1013 ? `server busy (${event.reason})` : "disconnected";
      el.status.textContent = `${why}; reconnecting…`;
      state.retry = Math.min(state.retry * 2, 10000);
      setTimeout(connect, event.code === 1013 ? 5000 : state.retry);
    };
  }

  async function startCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("The camera needs a secure page: open it on localhost or over https.");
      return;
    }
    try {
      state.media = await navigator.mediaDevices.getUserMedia({
        video: { facingMode: "user", width: { ideal: 640 }, height: { ideal: 480 } }, audio: false,
      });
    } catch (err) {
      showError(`Camera unavailable: ${err.message || err.name}`);
      return;
    }
    el.preview.srcObject = state.media;
    await el.preview.play();
    el.preview.classList.add("on");
    state.mode = "camera";
    el.camera.textContent = "Stop camera";
    el.camera.setAttribute("aria-pressed", "true");
    if (el.preview.videoWidth === 0) {
      el.preview.addEventListener("loadeddata", () => pump(), { once: true });
    } else {
      pump();
    }
  }

  function stopCamera() {
    if (state.media) for (const track of state.media.getTracks()) track.stop();
    state.media = null;
    el.preview.srcObject = null;
    el.preview.classList.remove("on");
    el.camera.textContent = "Start camera";
    el.camera.setAttribute("aria-pressed", "false");
    state.mode = state.uploadBlob ? "upload" : "text";
    state.dirty = true;
    pump();
  }

  async function upload() {
    const file = el.upload.files && el.upload.files[0];
    if (!file) return;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch (err) {
      showError(`Cannot read ${file.name}: not an image this browser decodes.`);
      return;
    }
    const { width, height } = state.config;
    const scale = Math.min(bitmap.width / width, bitmap.height / height);
    const sw = width * scale, sh = height * scale;
    canvas.width = width;
    canvas.height = height;
    canvas.getContext("2d").drawImage(bitmap, (bitmap.width - sw) / 2, (bitmap.height - sh) / 2, sw, sh,
                                      0, 0, width, height);
    bitmap.close();
    state.uploadBlob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    if (state.media) stopCamera();
    state.mode = "upload";
    state.dirty = true;
    pump();
  }

  function onSettings() {
    el.strengthValue.textContent = Number(el.strength.value).toFixed(2);
    el.controlScaleValue.textContent = Number(el.controlScale.value).toFixed(2);
    state.dirty = true;
    pump();
  }

  async function start() {
    const response = await fetch("/config");
    state.config = await response.json();
    const d = state.config.defaults;
    el.seed.value = d.seed;
    el.steps.value = d.steps;
    el.steps.max = state.config.max_steps;
    el.strength.value = d.strength;
    el.strengthValue.textContent = Number(d.strength).toFixed(2);
    if (!state.config.img2img) {
      el.camera.disabled = true;
      el.upload.disabled = true;
    }
    if (state.config.controlnets > 0) {
      el.controlBox.hidden = false;
      el.control.value = d.control;
      el.controlScale.value = d.control_scale;
      el.controlScaleValue.textContent = Number(d.control_scale).toFixed(2);
    }
    for (const input of [el.prompt, el.seed, el.steps, el.strength, el.control, el.controlScale]) {
      input.addEventListener("input", onSettings);
    }
    el.camera.addEventListener("click", () => (state.media ? stopCamera() : startCamera()));
    setInterval(() => {  // a reply that never came (a lost message, a stuck server) must not stall the page
      if (state.inFlight > 0 && performance.now() - state.sentAt > REPLY_TIMEOUT_MS) {
        state.inFlight = 0;
        state.dirty = true;
        showError("No reply from the server in time; sending again.");
        pump();
      }
    }, 1000);
    el.upload.addEventListener("change", upload);
    connect();
  }

  start().catch((err) => {
    el.status.textContent = "cannot reach the server";
    showError(String(err));
  });
})();
