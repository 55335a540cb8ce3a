// Minimal s2s client: the same call set-up as OpenAI's Realtime WebRTC clients.
const $ = (id) => document.getElementById(id);
let pc = null;
let callUrl = null;
// Exposed for debugging from the console (and for the browser tests).
window.s2s = { pc: null, events: [] };

function show(text) {
  $("log").textContent += text + "\n";
  $("log").scrollTop = $("log").scrollHeight;
}

async function connect() {
  $("connect").disabled = true;
  $("status").textContent = "connecting…";
  try {
    const mic = await navigator.mediaDevices.getUserMedia({ audio: true });
    pc = new RTCPeerConnection();
    pc.ontrack = (e) => { $("speaker").srcObject = e.streams[0] ?? new MediaStream([e.track]); };
    pc.onconnectionstatechange = () => { $("status").textContent = pc.connectionState; };
    mic.getTracks().forEach((t) => pc.addTrack(t, mic));
    const events = pc.createDataChannel("oai-events");
    events.onmessage = (e) => {
      window.s2s.events.push(JSON.parse(e.data));
      show("← " + e.data);
    };
    window.s2s.pc = pc;
    await pc.setLocalDescription(await pc.createOffer());
    const res = await fetch("/v1/realtime/calls", {
      method: "POST", body: pc.localDescription.sdp, headers: { "Content-Type": "application/sdp" },
    });
    if (res.status !== 201) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error?.message ?? `server answered ${res.status}`);
    }
    callUrl = res.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await res.text() });
    $("hangup").disabled = false;
  } catch (err) {
    $("status").textContent = "error: " + err.message;
    $("connect").disabled = false;
    pc?.close();
    pc = null;
  }
}

async function hangup() {
  if (callUrl) await fetch(callUrl + "/hangup", { method: "POST" }).catch(() => {});
  pc?.close();
  pc = null;
  callUrl = null;
  $("status").textContent = "idle";
  $("connect").disabled = false;
  $("hangup").disabled = true;
}

$("connect").onclick = connect;
$("hangup").onclick = hangup;
