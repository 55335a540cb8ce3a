// Drives s2s with the unmodified @openai/agents-realtime WebRTC client (from npm).
// The only s2s-specific settings: baseUrl points at our server, and the key is any "ek_" string
// (the SDK insists on an ephemeral key in browsers; s2s without --api-key accepts any).
import {
  OpenAIRealtimeWebRTC,
  RealtimeAgent,
  RealtimeSession,
} from "./node_modules/@openai/agents-realtime/dist/bundle/openai-realtime-agents.mjs";

const params = new URLSearchParams(location.search);
const server = params.get("server");
window.received = [];
window.errors = [];

async function main() {
  const transport = new OpenAIRealtimeWebRTC({ baseUrl: `${server}/v1/realtime/calls` });
  transport.on("*", (event) => window.received.push(event));
  const agent = new RealtimeAgent({ name: "Assistant", instructions: "Your name is Nova." });
  const session = new RealtimeSession(agent, { transport, model: "gpt-realtime" });
  session.on("error", (error) => window.errors.push(String(error?.error ?? error)));
  window.session = session;
  await session.connect({ apiKey: "ek_s2s_test" });
  document.getElementById("status").textContent = "connected";
  window.connected = true;
}

main().catch((error) => {
  window.errors.push(String(error));
  document.getElementById("status").textContent = `failed: ${error}`;
});
