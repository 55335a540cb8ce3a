// s2s demo page: one call over WebRTC, set up exactly as OpenAI's Realtime clients do it, with
// everything the server does on show. Plain ES module, no framework, no build step.
const $ = (id) => document.getElementById(id);
const CHUNK_BYTES = 150_000; // image bytes per s2s.image.chunk: keeps messages under 256 KiB
const ONE_MESSAGE_BYTES = 180_000; // pictures up to this go in one conversation.item.create

let call = null; // { pc, channel, mic, url, t0 }
const turns = new Map(); // item or response id -> transcript element
let turn = null; // timeline of the current turn
const answered = new Set(); // call ids this page has sent an output for

// The built-in demo tool: the model may ask the browser for the time in its own time zone.
// With the local model, type or say "current time" to have it called.
const DEMO_TOOL = {
  type: "function",
  name: "current_time",
  description: "The current date and time in the caller's time zone.",
  parameters: { type: "object", properties: {} },
};

function currentTime() {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone;
  const time = new Date().toLocaleTimeString([], { hour: "numeric", minute: "2-digit" });
  return `It is ${time} in ${zone.replaceAll("_", " ")}`;
}
// Exposed for the console (and the browser tests).
window.s2s = { pc: null, events: [], sent: [] };

// -- plumbing -----------------------------------------------------------------------------

function log(direction, event) {
  const line = document.createElement("div");
  line.textContent = `${direction} ${JSON.stringify(event)}`;
  $("log").append(line);
  while ($("log").childElementCount > 500) $("log").firstElementChild.remove();
}

function send(event) {
  if (!call?.channel || call.channel.readyState !== "open") return;
  call.channel.send(JSON.stringify(event));
  window.s2s.sent.push(event);
  log("→", event.type === "s2s.image.chunk" ? { ...event, data: `(${event.data.length} chars)` } : event);
}

function showError(text) {
  $("error").textContent = text;
}

function setConnected(on) {
  $("connect").disabled = on;
  $("hangup").disabled = !on;
  for (const id of ["message", "send", "interrupt", "talk", "snapshot", "picture", "apply"]) {
    $(id).disabled = !on;
  }
}

// -- connecting ---------------------------------------------------------------------------

async function connect() {
  showError("");
  $("status").textContent = "connecting…";
  $("connect").disabled = true;
  let mic;
  try {
    mic = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    showError(`The microphone is not available (${err.name}). Allow it for this page and retry.`);
    $("status").textContent = "idle";
    $("connect").disabled = false;
    return;
  }
  const pc = new RTCPeerConnection();
  const channel = pc.createDataChannel("oai-events");
  call = { pc, channel, mic, url: null, t0: performance.now() };
  window.s2s.pc = pc;
  mic.getTracks().forEach((track) => pc.addTrack(track, mic));
  pc.ontrack = (e) => {
    const stream = e.streams[0] ?? new MediaStream([e.track]);
    $("speaker").srcObject = stream;
    meter(stream, $("out-level"));
  };
  pc.onconnectionstatechange = () => {
    $("status").textContent = pc.connectionState;
    if (pc.connectionState === "connected") {
      $("stat-setup").textContent = `${Math.round(performance.now() - call.t0)} ms`;
    }
    if (pc.connectionState === "failed") showError("The connection to the server was lost.");
  };
  channel.onopen = () => {
    $("stat-channel").textContent = `${Math.round(performance.now() - call.t0)} ms`;
    applySettings();
  };
  channel.onmessage = (e) => receive(JSON.parse(e.data));
  meter(mic, $("mic-level"));
  try {
    await pc.setLocalDescription(await pc.createOffer());
    const response = await fetch("/v1/realtime/calls", {
      method: "POST", body: pc.localDescription.sdp, headers: { "Content-Type": "application/sdp" },
    });
    if (response.status !== 201) {
      const body = await response.json().catch(() => ({}));
      const why = body.error?.message ?? `the server answered ${response.status}`;
      throw new Error(response.status === 503 ? `The server is full; try again soon (${why}).` : why);
    }
    call.url = response.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
    setConnected(true);
  } catch (err) {
    showError(`Could not start the call: ${err.message}`);
    hangup();
  }
}

function hangup() {
  if (call?.url) fetch(`${call.url}/hangup`, { method: "POST" }).catch(() => {});
  call?.mic?.getTracks().forEach((t) => t.stop());
  call?.pc.close();
  call = null;
  window.s2s.pc = null;
  setConnected(false);
  $("status").textContent = "idle";
}

// -- server events ------------------------------------------------------------------------

function receive(event) {
  window.s2s.events.push(event);
  log("←", event);
  switch (event.type) {
    case "input_audio_buffer.speech_started":
      startTurn();
      mark("you started speaking");
      userTurn(event.item_id, "…", true);
      break;
    case "input_audio_buffer.speech_stopped":
      mark("you stopped");
      turn.stoppedAt = performance.now();
      break;
    case "conversation.item.input_audio_transcription.completed":
      userTurn(event.item_id, event.transcript || "(nothing recognised)", false);
      break;
    case "conversation.item.added": {
      const text = event.item.content?.find((c) => c.type === "input_text")?.text;
      if (event.item.role === "user" && text) userTurn(event.item.id, text, false);
      // A tool's output, whoever sent it (this page, or an app backend on the sideband).
      if (event.item.type === "function_call_output") {
        toolTurn(event.item.id, `← ${event.item.output}`);
      }
      break;
    }
    case "response.output_item.done":
      if (event.item.type === "function_call") {
        toolTurn(event.item.id, `${event.item.name}(${event.item.arguments})`);
        mark(`tool call: ${event.item.name}`);
        runTool(event.item);
      }
      break;
    case "response.created":
      if (!turn) startTurn();
      mark("reply started"); // its line appears with its first words (a tool call has none)
      break;
    case "output_audio_buffer.started":
      mark("first reply audio");
      if (turn?.stoppedAt) {
        $("turn-latency").textContent =
          `turn latency: ${Math.round(performance.now() - turn.stoppedAt)} ms (end of speech → first audio)`;
      }
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      assistantTurn(event.response_id).querySelector(".text").textContent += event.delta;
      break;
    case "response.done": {
      if (event.response.status === "cancelled") {
        const element = assistantTurn(event.response.id);
        const cut = document.createElement("span");
        cut.className = "cut";
        cut.textContent = " (interrupted)";
        element.append(cut);
      }
      mark(`reply ${event.response.status}`);
      turn = null;
      break;
    }
    case "s2s.image.received":
      mark(`picture received (${event.width}×${event.height})`);
      break;
    case "error":
      showError(event.error.message);
      break;
  }
}

function startTurn() {
  turn = { t0: performance.now(), stoppedAt: null };
  $("timeline").replaceChildren();
  $("turn-latency").textContent = "";
}

function mark(what) {
  if (!turn) startTurn();
  const item = document.createElement("li");
  item.textContent = `${Math.round(performance.now() - turn.t0)} ms — ${what}`;
  $("timeline").append(item);
}

function turnElement(id, role) {
  let element = turns.get(id);
  if (!element) {
    element = document.createElement("div");
    element.className = `turn ${role}`;
    const who = { user: "You", assistant: "Model", tool: "Tool" }[role];
    element.innerHTML = `<strong>${who}:</strong> <span class="text"></span>`;
    $("transcript").append(element);
    turns.set(id, element);
  }
  $("transcript").scrollTop = $("transcript").scrollHeight;
  return element;
}

function toolTurn(id, text) {
  turnElement(id, "tool").querySelector(".text").textContent = text;
}

function runTool(item) {
  if (item.name !== DEMO_TOOL.name || answered.has(item.call_id)) return;
  answered.add(item.call_id);
  send({ type: "conversation.item.create",
         item: { type: "function_call_output", call_id: item.call_id, output: currentTime() } });
  send({ type: "response.create" });
}

function userTurn(id, text, partial) {
  const element = turnElement(id, "user");
  element.classList.toggle("partial", partial);
  element.querySelector(".text").textContent = text;
}

function assistantTurn(id) {
  return turnElement(id, "assistant");
}

// -- controls -----------------------------------------------------------------------------

function applySettings() {
  send({
    type: "session.update",
    session: {
      type: "realtime",
      instructions: $("instructions").value,
      tools: $("demo-tool").checked ? [DEMO_TOOL] : [],
      audio: {
        input: { turn_detection: $("vad").checked ? { type: "server_vad" } : null },
        output: { voice: $("voice").value, speed: Number($("speed").value) },
      },
    },
  });
}

function sendMessage() {
  const text = $("message").value.trim();
  if (!text) return;
  $("message").value = "";
  startTurn();
  send({ type: "conversation.item.create",
         item: { type: "message", role: "user", content: [{ type: "input_text", text }] } });
  send({ type: "response.create" });
}

function interrupt() {
  send({ type: "response.cancel" });
  send({ type: "output_audio_buffer.clear" });
}

async function snapshot() {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true });
  } catch (err) {
    showError(`The camera is not available (${err.name}); pick a picture instead.`);
    return;
  }
  try {
    const video = document.createElement("video");
    video.muted = true;
    video.srcObject = stream;
    await video.play();
    const canvas = document.createElement("canvas");
    canvas.width = video.videoWidth;
    canvas.height = video.videoHeight;
    canvas.getContext("2d").drawImage(video, 0, 0);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.9));
    await sendPicture(blob);
  } finally {
    stream.getTracks().forEach((t) => t.stop());
  }
}

async function sendPicture(blob) {
  $("snapshot-preview").src = URL.createObjectURL(blob);
  $("snapshot-preview").style.display = "block";
  const bytes = new Uint8Array(await blob.arrayBuffer());
  if (bytes.length <= ONE_MESSAGE_BYTES) {
    const url = `data:${blob.type || "image/jpeg"};base64,${base64(bytes)}`;
    send({ type: "conversation.item.create",
           item: { type: "message", role: "user", content: [{ type: "input_image", image_url: url }] } });
    return;
  }
  const uploadId = `pic-${Date.now()}`;
  const total = Math.ceil(bytes.length / CHUNK_BYTES);
  for (let index = 0; index < total; index++) {
    const data = base64(bytes.subarray(index * CHUNK_BYTES, (index + 1) * CHUNK_BYTES));
    send({ type: "s2s.image.chunk", upload_id: uploadId, index, total, data });
  }
  send({ type: "s2s.image.commit", upload_id: uploadId });
}

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

// -- levels and statistics ----------------------------------------------------------------

function meter(stream, bar) {
  const context = new AudioContext();
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  context.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const draw = () => {
    if (!call) return;
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length);
    bar.style.width = `${Math.min(100, rms * 400)}%`;
    requestAnimationFrame(draw);
  };
  draw();
}

let previous = null;
async function updateStats() {
  if (!call) return;
  const report = await call.pc.getStats();
  const now = { time: performance.now(), bytesIn: 0, bytesOut: 0 };
  report.forEach((s) => {
    if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
      $("stat-rtt").textContent = `${Math.round(s.currentRoundTripTime * 1000)} ms`;
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      now.bytesIn = s.bytesReceived;
      $("stat-jitter").textContent = `${Math.round((s.jitter ?? 0) * 1000)} ms`;
      $("stat-lost").textContent = `${s.packetsLost ?? 0}`;
      $("stat-level").textContent = (s.audioLevel ?? 0).toFixed(3);
    }
    if (s.type === "outbound-rtp" && s.kind === "audio") now.bytesOut = s.bytesSent;
  });
  if (previous) {
    const seconds = (now.time - previous.time) / 1000;
    $("stat-in").textContent = `${Math.round(((now.bytesIn - previous.bytesIn) * 8) / seconds / 1000)} kbps`;
    $("stat-out").textContent = `${Math.round(((now.bytesOut - previous.bytesOut) * 8) / seconds / 1000)} kbps`;
  }
  previous = now;
}
setInterval(() => updateStats().catch(() => {}), 1000);

// -- wiring -------------------------------------------------------------------------------

$("connect").onclick = connect;
$("hangup").onclick = hangup;
$("send").onclick = sendMessage;
$("message").onkeydown = (e) => { if (e.key === "Enter") sendMessage(); };
$("interrupt").onclick = interrupt;
$("apply").onclick = applySettings;
$("vad").onchange = applySettings;
$("demo-tool").onchange = applySettings;
$("snapshot").onclick = () => snapshot().catch((err) => showError(err.message));
$("picture").onchange = (e) => { if (e.target.files[0]) sendPicture(e.target.files[0]); };
const talkStart = () => send({ type: "input_audio_buffer.clear" });
const talkEnd = () => {
  startTurn();
  send({ type: "input_audio_buffer.commit" });
  send({ type: "response.create" });
};
$("talk").onpointerdown = talkStart;
$("talk").onpointerup = talkEnd;
