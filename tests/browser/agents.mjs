// Drives s2s with the unmodified @openai/agents-realtime WebRTC client (from npm).
// The only s2s-specific settings: baseUrl points at our server, and the key is any "ek_" string
// (the SDK insists on an ephemeral key in browsers; s2s without --api-key accepts any).
import {
  OpenAIRealtimeWebRTC,
  RealtimeAgent,
  RealtimeSession,
  tool,
} from "./node_modules/@openai/agents-realtime/dist/bundle/openai-realtime-agents.mjs";

const params = new URLSearchParams(location.search);
const server = params.get("server");
window.received = [];
window.errors = [];
window.toolCalls = [];

// With ?tool=1 the agent has one function tool, run by the SDK itself when s2s calls it.
const weather = tool({
  name: "get_weather",
  description: "The weather in a city.",
  parameters: {
    type: "object",
    properties: { city: { type: "string" } },
    required: ["city"],
    additionalProperties: false,
  },
  strict: true,
  execute: async ({ city }) => {
    window.toolCalls.push(city);
    return `sunny in ${city}, 21 degrees`;
  },
});

async function main() {
  const transport = new OpenAIRealtimeWebRTC({ baseUrl: `${server}/v1/realtime/calls` });
  transport.on("*", (event) => window.received.push(event));
  const tools = params.get("tool") ? [weather] : [];
  const agent = new RealtimeAgent({ name: "Assistant", instructions: "Your name is Nova.", tools });
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
