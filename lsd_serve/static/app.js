// The lsd serve browser client (protocol: lsd_serve/PROTOCOL.md).
// Captures a camera or a screen, sends frames cropped and scaled to the model's size as JPEG over
// the WebSocket, draws each returned frame to the canvas and shows the count, FPS and latency.
// `?autostart=camera|screen` starts at load; `?token=T` is passed on to the WebSocket.
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const MAX_IN_FLIGHT = 2;  // frames sent and not yet answered; the server drops older ones anyway

let ws = null, media = null, ready = null, pendingMeta = null;
let sent = 0, received = 0, answeredSeq = 0, lastSendMs = 0, encoding = false;
const sentAtMs = new Map();
const latencies = [];
const receivedAtMs = [];
const grab = document.createElement("canvas");

function showError(text) { $("error").textContent = text; }

// The nearest trained prompt to what is in the prompt box, asked for as the user types (after a
// short pause) and shown under it: {"type": "nearest"} in lsd_serve/PROTOCOL.md.
let nearestTimer = null;
function askNearest() {
  clearTimeout(nearestTimer);
  nearestTimer = setTimeout(() => {
    if (ws && ws.readyState === WebSocket.OPEN) send({type: "nearest", text: $("prompt").value});
  }, 200);
}

function showNearest(message) {
  if (message.text !== $("prompt").value) return;  // an answer about older text
  if (message.nearest === null) {
    $("nearest").textContent = "";
  } else if (message.trained) {
    $("nearest").textContent = "a prompt the model was trained on";
  } else {
    const how = `cosine similarity ${message.similarity.toFixed(2)}, ${message.encoder} encoder`;
    $("nearest").textContent = message.near
      ? `reads as the trained prompt "${message.nearest}" (${how})`
      : `far from every trained prompt; nearest: "${message.nearest}" (${how})`;
  }
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

async function openMedia(kind) {
  if (kind === "screen") {
    return navigator.mediaDevices.getDisplayMedia({video: {frameRate: 30}, audio: false});
  }
  return navigator.mediaDevices.getUserMedia({video: {width: 640, height: 480}, audio: false});
}

function send(message) { ws.send(JSON.stringify(message)); }

function captureLoop() {
  if (!ws || ws.readyState !== WebSocket.OPEN || !ready) return;
  const video = $("input");
  const now = performance.now();
  // Send when few frames are outstanding, or after a second of silence (a frame can be dropped).
  const inFlight = sent - answeredSeq;
  // One JPEG encode at a time: `sent` counts only when an encode finishes, so without this the
  // timer would start several encodes before the in-flight count sees any of them.
  if (video.videoWidth > 0 && !encoding &&
      (inFlight < MAX_IN_FLIGHT || now - lastSendMs > 1000)) {
    const w = ready.frame_width, h = ready.frame_height;
    // Centre crop to the model's aspect, then scale: the server accepts exactly w x h.
    const vw = video.videoWidth, vh = video.videoHeight;
    const scale = Math.min(vw / w, vh / h);
    const cw = w * scale, ch = h * scale;
    grab.getContext("2d").drawImage(video, (vw - cw) / 2, (vh - ch) / 2, cw, ch, 0, 0, w, h);
    lastSendMs = now;
    encoding = true;
    grab.toBlob((blob) => {
      encoding = false;
      if (!blob || !ws || ws.readyState !== WebSocket.OPEN) return;
      sent += 1;
      sentAtMs.set(sent, performance.now());
      ws.send(blob);
    }, "image/jpeg", 0.9);
  }
  // A timer, not requestAnimationFrame: animation frames stop while the tab is hidden (a user
  // sharing another window), a timer keeps the stream going.
  setTimeout(captureLoop, 5);
}

async function onFrame(blob) {
  const meta = pendingMeta;
  pendingMeta = null;
  const bitmap = await createImageBitmap(blob);
  $("output").getContext("2d").drawImage(bitmap, 0, 0);
  const now = performance.now();
  received += 1;
  answeredSeq = Math.max(answeredSeq, meta.seq);
  const latency = now - sentAtMs.get(meta.seq);
  for (const seq of sentAtMs.keys()) if (seq <= meta.seq) sentAtMs.delete(seq);
  latencies.push(latency);
  if (latencies.length > 100) latencies.shift();
  receivedAtMs.push(now);
  while (receivedAtMs.length && now - receivedAtMs[0] > 1000) receivedAtMs.shift();
  $("received").textContent = String(received);
  $("latency").textContent = latency.toFixed(1);
  $("latency-median").textContent = median(latencies).toFixed(1);
  $("fps").textContent = receivedAtMs.length.toFixed(1);
  $("steps-used").textContent = `${meta.steps}/${meta.requested_steps}`;
  $("dropped").textContent = String(meta.dropped);
}

function onControl(message) {
  if (message.type === "ready") {
    ready = message;
    $("output").width = message.frame_width;
    $("output").height = message.frame_height;
    grab.width = message.frame_width;
    grab.height = message.frame_height;
    $("steps").innerHTML = message.step_choices
      .map((k) => `<option value="${k}" ${k === message.steps ? "selected" : ""}>${k}</option>`)
      .join("");
    $("prompt").value = message.prompt;
    $("status").textContent = `session ${message.session}: ${message.frame_width}x` +
      `${message.frame_height}, ${message.engine}`;
    if (message.untrained) {
      $("note").textContent = "The model is untrained (random weights): the output shows the " +
        "loop running, not a style.";
    }
    askNearest();
    captureLoop();
  } else if (message.type === "nearest") {
    showNearest(message);
  } else if (message.type === "frame") {
    pendingMeta = message;  // its JPEG is the next binary message
  } else if (message.type === "error") {
    showError(`${message.code}: ${message.message}`);
  }
}

async function start() {
  showError("");
  try {
    media = await openMedia($("source").value);
  } catch (err) {
    showError(`cannot open the ${$("source").value}: ${err}`);
    return;
  }
  $("input").srcObject = media;
  const token = params.get("token");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${scheme}://${location.host}/ws` +
                     (token ? `?token=${encodeURIComponent(token)}` : ""));
  ws.binaryType = "blob";
  ws.onmessage = (event) => {
    if (typeof event.data === "string") onControl(JSON.parse(event.data));
    else if (pendingMeta) onFrame(event.data);
  };
  ws.onclose = (event) => {
    $("status").textContent = `disconnected (${event.code}${event.reason ? ": " + event.reason : ""})`;
    ready = null;
  };
  $("start").disabled = true;
  $("stop").disabled = false;
}

function stop() {
  if (ws) ws.close();
  if (media) media.getTracks().forEach((track) => track.stop());
  ws = null;
  media = null;
  $("start").disabled = false;
  $("stop").disabled = true;
}

$("start").onclick = start;
$("stop").onclick = stop;
$("set-prompt").onclick = () => ws && send({type: "prompt", text: $("prompt").value, id: Date.now()});
$("prompt").onkeydown = (event) => { if (event.key === "Enter") $("set-prompt").click(); };
$("prompt").oninput = askNearest;
$("steps").onchange = () => ws && send({type: "steps", steps: Number($("steps").value)});
$("reset").onclick = () => ws && send({type: "reset", id: Date.now()});
if (params.get("autostart")) {
  $("source").value = params.get("autostart");
  start();
}
