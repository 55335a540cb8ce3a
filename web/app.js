// s2s demo page: one call over WebRTC, set up exactly as OpenAI's Realtime clients do it, with
// everything the server does on show. Plain ES module, no framework, no build step.
const $ = (id) => document.getElementById(id);
const CHUNK_BYTES = 150_000; // image bytes per s2s.image.chunk: keeps messages under 256 KiB
const ONE_MESSAGE_BYTES = 180_000; // pictures up to this go in one conversation.item.create
// Pictures are re-encoded before they leave: the server keeps at most 1024 px a side anyway, and
// a phone's 12 MP photo sent whole would be most of the call's event allowance (or end the call).
const PICTURE_MAX_SIDE = 1024;
const PICTURE_QUALITY = 0.85;
// Chunks wait while more than this is queued on the data channel, so a picture never floods it.
const CHANNEL_LOW_WATER = 1_000_000;
const CONNECT_TIMEOUT_MS = 15_000; // offer answered and events channel open, or give up
const ERROR_SHOWN_MS = 8_000; // how long a passing error stays up
const KEEP = 1000; // events kept in window.s2s.events / .sent (older ones are dropped)

// The call in progress, from Connect until it ends:
// { pc, channel, mic, url, key, t0, abort, timer, open, contexts, previous, noTools,
//   commitPending, answered, followUps, endHint }
let call = null;
const turns = new Map(); // item or response id -> transcript element (this call's)
let turn = null; // timeline of the current turn: { t0, stoppedAt, responseId }
let talking = false; // the hold-to-talk button is held (pointer or Space)

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
// Exposed for the console (and the browser tests). Picture bytes are never kept here.
window.s2s = { pc: null, events: [], sent: [] };

// -- plumbing -----------------------------------------------------------------------------

// A copy of an event without picture bytes, for the log and window.s2s: a few pictures' base64
// kept for the whole call would be megabytes nobody reads.
function redact(event) {
  if (event.type === "s2s.image.chunk") {
    return { ...event, data: `(${event.data.length} base64 chars)` };
  }
  const content = event.item?.content;
  const isData = (part) => typeof part?.image_url === "string" && part.image_url.startsWith("data:");
  if (Array.isArray(content) && content.some(isData)) {
    const parts = content.map((part) =>
      isData(part) ? { ...part, image_url: `data:… (${part.image_url.length} chars)` } : part);
    return { ...event, item: { ...event.item, content: parts } };
  }
  return event;
}

function keep(list, entry) {
  list.push(entry);
  if (list.length > KEEP) list.splice(0, list.length - KEEP);
}

function log(direction, event) {
  const line = document.createElement("div");
  line.textContent = `${direction} ${JSON.stringify(event)}`;
  $("log").append(line);
  while ($("log").childElementCount > 500) $("log").firstElementChild.remove();
}

function isOpen() {
  return call?.channel?.readyState === "open";
}

// Sends one client event; false (and an error on show) when it could not go.
function send(event) {
  if (!isOpen()) {
    showError("Not connected: nothing was sent.");
    return false;
  }
  try {
    call.channel.send(JSON.stringify(event));
  } catch (err) { // the channel closed under us, or its send queue is full
    showError(`Could not send ${event.type}: ${err.message}`);
    return false;
  }
  const copy = redact(event);
  keep(window.s2s.sent, copy);
  log("→", copy);
  clearError(); // whatever went wrong before, this went out
  return true;
}

let errorTimer = null;
let errorSticky = false;

// A passing error goes away after a few seconds or on the next thing that works; a sticky one
// (why the call ended) stays until the next Connect.
function showError(text, { sticky = false } = {}) {
  clearTimeout(errorTimer);
  $("error").textContent = text;
  errorSticky = sticky;
  if (text && !sticky) errorTimer = setTimeout(() => clearError(), ERROR_SHOWN_MS);
}

function clearError({ sticky = false } = {}) {
  if (errorSticky && !sticky) return;
  showError("");
}

// A one-line notice that is not an error (the model takes no tools, the server is stopping).
function note(text) {
  $("note").textContent = text;
}

// idle: nothing going on; connecting: Hang up can cancel; open: the events channel is open.
function setState(state) {
  const open = state === "open";
  $("connect").disabled = state !== "idle";
  $("hangup").disabled = state === "idle";
  $("key").disabled = state !== "idle";
  for (const id of ["message", "send", "interrupt", "snapshot", "picture", "apply"]) {
    $(id).disabled = !open;
  }
  updateTalk();
}

// Hold-to-talk is for when the caller commits the turn: with server VAD on, the server does.
function updateTalk() {
  $("talk").disabled = !isOpen() || $("vad").checked;
  // A disabled button may never get the press's pointerup: the press is over, uncommitted.
  if ($("talk").disabled) talking = false;
}

// -- connecting ---------------------------------------------------------------------------

async function connect() {
  clearError({ sticky: true });
  note("");
  const self = {
    pc: null, channel: null, mic: null, url: null, key: $("key").value.trim(),
    t0: performance.now(), abort: new AbortController(), timer: null, open: false,
    contexts: [], previous: null, noTools: false, commitPending: false, answered: new Set(),
    followUps: new Set(), // responses that called the demo tool: answer when they are done
    endHint: null,
  };
  call = self;
  // A fresh page for the new call: its events, transcript, timeline and figures only.
  window.s2s.events.length = 0;
  window.s2s.sent.length = 0;
  turns.clear();
  turn = null;
  $("transcript").replaceChildren();
  $("timeline").replaceChildren();
  $("turn-latency").textContent = "";
  for (const figure of $("stats").querySelectorAll("dd")) figure.textContent = "–";
  $("status").textContent = "connecting…";
  setState("connecting");

  let mic;
  try {
    mic = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    if (call === self) {
      end(`The microphone is not available (${err.name}). Allow it for this page and retry.`);
    }
    return;
  }
  if (call !== self) { // hung up while the browser asked for the microphone
    mic.getTracks().forEach((t) => t.stop());
    return;
  }
  self.mic = mic;
  // The clock starts once the mic is ours (a permission prompt may take the caller a while).
  self.timer = setTimeout(() => {
    end(`No answer from the server within ${CONNECT_TIMEOUT_MS / 1000} s; try again.`,
        { notify: true });
  }, CONNECT_TIMEOUT_MS);

  const pc = new RTCPeerConnection();
  const channel = pc.createDataChannel("oai-events");
  channel.bufferedAmountLowThreshold = CHANNEL_LOW_WATER;
  self.pc = pc;
  self.channel = channel;
  window.s2s.pc = pc;
  mic.getTracks().forEach((track) => pc.addTrack(track, mic));
  pc.ontrack = (e) => {
    if (call !== self) return;
    const stream = e.streams[0] ?? new MediaStream([e.track]);
    $("speaker").srcObject = stream;
    meter(self, stream, $("out-level"));
  };
  pc.onconnectionstatechange = () => {
    if (call !== self) return;
    $("status").textContent = pc.connectionState;
    if (pc.connectionState === "connected") {
      $("stat-setup").textContent = `${Math.round(performance.now() - self.t0)} ms`;
    }
    if (pc.connectionState === "failed") {
      end("The connection to the server was lost.", { notify: true });
    }
    if (pc.connectionState === "closed") end(endReason(self));
  };
  channel.onopen = () => {
    if (call !== self) return;
    clearTimeout(self.timer);
    self.open = true;
    $("stat-channel").textContent = `${Math.round(performance.now() - self.t0)} ms`;
    setState("open");
    applySettings();
  };
  // The server closes the channel when it ends the call (hangup elsewhere, a limit, shutdown).
  channel.onclose = () => {
    if (call === self) end(endReason(self));
  };
  channel.onmessage = (e) => {
    if (call !== self) return;
    let event;
    try {
      event = JSON.parse(e.data);
    } catch {
      return; // not JSON: nothing the page can show
    }
    receive(event);
  };
  meter(self, mic, $("mic-level"));
  try {
    await pc.setLocalDescription(await pc.createOffer());
    const headers = { "Content-Type": "application/sdp" };
    if (self.key) headers.Authorization = `Bearer ${self.key}`;
    const response = await fetch("/v1/realtime/calls", {
      method: "POST", body: pc.localDescription.sdp, headers, signal: self.abort.signal,
    });
    if (response.status !== 201) {
      const body = await response.json().catch(() => ({}));
      const why = body.error?.message ?? `the server answered ${response.status}`;
      if (response.status === 503) throw new Error(`The server is full; try again soon (${why}).`);
      if (response.status === 401) {
        throw new Error(`the server wants a key: put a client secret (ek_…) from your app ` +
                        `backend in the key field (${why})`);
      }
      throw new Error(why);
    }
    self.url = response.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await response.text() });
  } catch (err) {
    // Hung up or timed out meanwhile: end() has already said why.
    if (call === self) end(`Could not start the call: ${err.message}`, { notify: true });
  }
}

// Why a call the page did not end has ended, as well as the page can tell.
function endReason(self) {
  return self.endHint ? `The call ended: ${self.endHint}` : "The server ended the call.";
}

function hangup() {
  end(null, { notify: true });
}

// Ends the call (or the connect in progress) and frees what it held. `reason`, if any, stays on
// show; `notify` tells the server, which is only worth it when the server may not know yet.
function end(reason, { notify = false } = {}) {
  const self = call;
  if (!self) return;
  call = null;
  turn = null;
  turns.clear();
  clearTimeout(self.timer);
  self.abort.abort(); // a fetch of the offer's answer still under way
  if (notify && self.url) {
    const headers = self.key ? { Authorization: `Bearer ${self.key}` } : {};
    fetch(`${self.url}/hangup`, { method: "POST", headers }).catch(() => {});
  }
  self.mic?.getTracks().forEach((t) => t.stop());
  self.pc?.close();
  for (const context of self.contexts) context.close().catch(() => {});
  $("mic-level").style.width = "0";
  $("out-level").style.width = "0";
  $("speaker").srcObject = null;
  window.s2s.pc = null;
  if (self.noTools) { // this call's model took no tools; the next call may
    $("demo-tool").checked = true;
    $("demo-tool").disabled = false;
  }
  setState("idle");
  $("status").textContent = "idle";
  if (reason) showError(reason, { sticky: true });
}

// -- server events ------------------------------------------------------------------------

function receive(event) {
  keep(window.s2s.events, event);
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
    case "input_audio_buffer.committed":
      // Push-to-talk: the turn is in; only now ask for the reply (an empty one was refused).
      if (call.commitPending) {
        call.commitPending = false;
        send({ type: "response.create" });
      }
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
        runTool(event.item, event.response_id);
      }
      break;
    case "response.created":
      // A turn waits for one response at a time: a tool call's follow-up stays on its turn.
      if (!turn || turn.responseId) startTurn();
      turn.responseId = event.response.id;
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
    case "response.done":
      responseDone(event.response);
      break;
    case "s2s.image.received":
      mark(`picture received (${event.width}×${event.height})`);
      break;
    case "s2s.server.shutdown":
      call.endHint = "the server shut down";
      note(`The server is shutting down: this call ends within ${event.grace_s} s.`);
      break;
    case "error":
      serverError(event.error);
      break;
  }
}

function responseDone(response) {
  if (call.followUps.delete(response.id) && response.status === "completed") {
    send({ type: "response.create" }); // the tool's output is in: the model answers with it
  }
  if (response.status === "cancelled") afterReply(response.id, "cut", " (interrupted)");
  if (response.status === "failed") {
    const why = response.status_details?.error?.message ?? "the model failed";
    afterReply(response.id, "failed", ` (failed: ${why})`);
    showError(`The reply failed: ${why}`);
  }
  // Only the response this turn waits for ends it; a late one (cancelled by a barge-in that
  // already started the next turn) must not end the new turn.
  if (!turn || turn.responseId !== response.id) return;
  mark(`reply ${response.status}`);
  const calledTool = response.output?.some((item) => item.type === "function_call");
  if (response.status === "completed" && calledTool) {
    turn.responseId = null; // the tool's output brings a follow-up response on this turn
  } else {
    turn = null;
  }
}

function afterReply(responseId, className, text) {
  const words = document.createElement("span");
  words.className = className;
  words.textContent = text;
  assistantTurn(responseId).append(words);
}

function serverError(error) {
  if (error.code === "tools_not_supported") {
    // echo and moshi take no tools: stop offering ours for the rest of the call.
    call.noTools = true;
    $("demo-tool").checked = false;
    $("demo-tool").disabled = true;
    note("This model cannot call tools: the demo tool is off for this call.");
    return;
  }
  if (error.code === "input_audio_buffer_commit_empty" && call.commitPending) {
    call.commitPending = false; // nothing to reply to
    showError(`Hold the button while you speak: ${error.message}`);
    return;
  }
  // A limit's error often comes just before the server ends the call: say so then.
  if (error.type === "limit_error") call.endHint = error.message;
  showError(error.message);
}

function startTurn() {
  turn = { t0: performance.now(), stoppedAt: null, responseId: null };
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

function runTool(item, responseId) {
  if (item.name !== DEMO_TOOL.name || call.answered.has(item.call_id)) return;
  call.answered.add(item.call_id);
  const output = { type: "function_call_output", call_id: item.call_id, output: currentTime() };
  // The reply to the output is asked for once the response that called the tool is done (one
  // that also speaks is still in progress now, and a second response would be refused).
  if (send({ type: "conversation.item.create", item: output })) call.followUps.add(responseId);
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
  updateTalk();
  if (!isOpen()) return; // channel.onopen applies them
  send({
    type: "session.update",
    session: {
      type: "realtime",
      instructions: $("instructions").value,
      tools: $("demo-tool").checked && !call.noTools ? [DEMO_TOOL] : [],
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
  const message = { type: "message", role: "user", content: [{ type: "input_text", text }] };
  if (!send({ type: "conversation.item.create", item: message })) return; // the text stays
  $("message").value = "";
  startTurn();
  turn.stoppedAt = performance.now(); // typing's "end of speech": the latency counts from here
  mark("message sent");
  send({ type: "response.create" });
}

// output_audio_buffer.clear alone: it cancels a response in progress and stops its audio, and
// with nothing playing it is no error (response.cancel would be).
function interrupt() {
  send({ type: "output_audio_buffer.clear" });
}


function talkStart() {
  if (talking || $("talk").disabled) return;
  talking = true;
  call.commitPending = false; // a press before the last one's commit came back supersedes it
  // Pressing to talk interrupts the model, as speaking does with server VAD.
  if (!send({ type: "output_audio_buffer.clear" })) return;
  if (!send({ type: "input_audio_buffer.clear" })) return;
  startTurn();
  mark("you started talking");
}

function talkEnd() {
  if (!talking) return;
  talking = false;
  if (!call) return;
  if (turn) turn.stoppedAt = performance.now();
  mark("you stopped");
  // response.create follows once input_audio_buffer.committed says the turn is in.
  call.commitPending = send({ type: "input_audio_buffer.commit" });
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
    await sendPicture(await toJpeg(video, video.videoWidth, video.videoHeight));
  } finally {
    stream.getTracks().forEach((t) => t.stop());
  }
}

// A picked file: whatever the browser can decode (HEIC usually not) goes as a JPEG of at most
// 1024 px a side; the server takes only JPEG, PNG and WebP, and keeps no more pixels anyway.
async function pictureFile(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showError(`This browser cannot read ${file.name}; pick a JPEG, PNG or WebP picture.`);
    return;
  }
  try {
    await sendPicture(await toJpeg(bitmap, bitmap.width, bitmap.height));
  } finally {
    bitmap.close();
  }
}

async function toJpeg(source, width, height) {
  if (!width || !height) throw new Error("the picture has no pixels");
  const scale = Math.min(1, PICTURE_MAX_SIDE / Math.max(width, height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(width * scale));
  canvas.height = Math.max(1, Math.round(height * scale));
  const context = canvas.getContext("2d");
  context.fillStyle = "#fff"; // JPEG has no transparency: see-through parts come out white
  context.fillRect(0, 0, canvas.width, canvas.height);
  context.drawImage(source, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", PICTURE_QUALITY));
  if (!blob) throw new Error("the picture could not be encoded");
  return blob;
}

let uploads = 0; // numbers this page's upload ids

async function sendPicture(blob) {
  const self = call;
  if (!self) return;
  showPreview(blob);
  const bytes = new Uint8Array(await blob.arrayBuffer());
  if (bytes.length <= ONE_MESSAGE_BYTES) {
    const url = `data:image/jpeg;base64,${base64(bytes)}`;
    send({ type: "conversation.item.create",
           item: { type: "message", role: "user", content: [{ type: "input_image", image_url: url }] } });
    return;
  }
  const uploadId = `pic-${Date.now()}-${++uploads}`;
  const total = Math.ceil(bytes.length / CHUNK_BYTES);
  for (let index = 0; index < total; index++) {
    await drained(self.channel);
    if (call !== self) return; // the call ended meanwhile
    const data = base64(bytes.subarray(index * CHUNK_BYTES, (index + 1) * CHUNK_BYTES));
    if (!send({ type: "s2s.image.chunk", upload_id: uploadId, index, total, data })) return;
  }
  send({ type: "s2s.image.commit", upload_id: uploadId });
}

// Resolves once the channel's send queue is down to its low-water mark (or the channel closed).
function drained(channel) {
  // A closed channel keeps its last bufferedAmount and fires no more events: no waiting on it.
  if (channel.readyState !== "open" ||
      channel.bufferedAmount <= channel.bufferedAmountLowThreshold) return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      channel.removeEventListener("bufferedamountlow", done);
      channel.removeEventListener("close", done);
      resolve();
    };
    channel.addEventListener("bufferedamountlow", done);
    channel.addEventListener("close", done);
  });
}

function showPreview(blob) {
  const preview = $("snapshot-preview");
  const url = URL.createObjectURL(blob);
  // Once shown, the image no longer needs its URL; revoking it frees the blob.
  preview.onload = preview.onerror = () => URL.revokeObjectURL(url);
  preview.src = url;
  preview.style.display = "block";
}

function base64(bytes) {
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

// -- levels and statistics ----------------------------------------------------------------

// A level bar for a stream; its AudioContext belongs to the call and is closed when it ends.
function meter(self, stream, bar) {
  const context = new AudioContext();
  self.contexts.push(context);
  const analyser = context.createAnalyser();
  analyser.fftSize = 512;
  context.createMediaStreamSource(stream).connect(analyser);
  const samples = new Float32Array(analyser.fftSize);
  const draw = () => {
    if (call !== self) return;
    analyser.getFloatTimeDomainData(samples);
    const rms = Math.sqrt(samples.reduce((sum, x) => sum + x * x, 0) / samples.length);
    bar.style.width = `${Math.min(100, rms * 400)}%`;
    requestAnimationFrame(draw);
  };
  draw();
}

async function updateStats() {
  const self = call;
  if (!self?.pc) return;
  const report = await self.pc.getStats();
  if (call !== self) return; // ended while the figures came
  const now = { time: performance.now(), bytesIn: 0, bytesOut: 0 };
  report.forEach((s) => {
    if (s.type === "candidate-pair" && s.nominated && s.currentRoundTripTime !== undefined) {
      $("stat-rtt").textContent = `${Math.round(s.currentRoundTripTime * 1000)} ms`;
    }
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      now.bytesIn = s.bytesReceived ?? 0;
      $("stat-jitter").textContent = `${Math.round((s.jitter ?? 0) * 1000)} ms`;
      $("stat-lost").textContent = `${s.packetsLost ?? 0}`;
      $("stat-level").textContent = (s.audioLevel ?? 0).toFixed(3);
    }
    if (s.type === "outbound-rtp" && s.kind === "audio") now.bytesOut = s.bytesSent ?? 0;
  });
  const previous = self.previous; // per call: a new call's counters start again from zero
  if (previous) {
    const seconds = (now.time - previous.time) / 1000;
    $("stat-in").textContent = `${Math.round(((now.bytesIn - previous.bytesIn) * 8) / seconds / 1000)} kbps`;
    $("stat-out").textContent = `${Math.round(((now.bytesOut - previous.bytesOut) * 8) / seconds / 1000)} kbps`;
  }
  self.previous = now;
}
setInterval(() => updateStats().catch(() => {}), 1000);

// -- wiring -------------------------------------------------------------------------------

$("connect").onclick = connect;
$("hangup").onclick = hangup;
$("send").onclick = sendMessage;
$("message").onkeydown = (e) => {
  // Enter that confirms an input method's composition (Japanese, Chinese…) is not a send.
  if (e.key === "Enter" && !e.isComposing && e.keyCode !== 229) sendMessage();
};
$("interrupt").onclick = interrupt;
$("apply").onclick = applySettings;
$("vad").onchange = applySettings;
$("demo-tool").onchange = applySettings;
$("snapshot").onclick = () => snapshot().catch((err) => showError(`No snapshot: ${err.message}`));
$("picture").onchange = (e) => {
  const file = e.target.files[0];
  e.target.value = ""; // so that picking the same file again is a change too
  if (file) pictureFile(file).catch((err) => showError(`The picture was not sent: ${err.message}`));
};
// Hold to talk, with a pointer (captured, so releasing it off the button still counts; a
// cancelled pointer counts as a release) or with Space while the button has the focus.
$("talk").onpointerdown = (e) => {
  if (e.button !== 0) return;
  try {
    $("talk").setPointerCapture(e.pointerId);
  } catch {
    // the pointer is already gone: its pointerup/cancel ends the press
  }
  talkStart();
};
$("talk").onpointerup = talkEnd;
$("talk").onpointercancel = talkEnd;
$("talk").onlostpointercapture = talkEnd;
$("talk").onkeydown = (e) => {
  if (e.key !== " ") return;
  e.preventDefault();
  if (!e.repeat) talkStart();
};
$("talk").onkeyup = (e) => {
  if (e.key !== " ") return;
  e.preventDefault(); // no click: the press is handled here
  talkEnd();
};
$("talk").onblur = talkEnd; // focus moved away with Space still down
