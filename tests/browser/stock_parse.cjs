// Reads a JSON array of server events on stdin and writes, as JSON, the ones the stock
// @openai/agents-realtime client knows by type but cannot parse as that event (it then passes
// them on as "generic" events: its session ignores them), with zod's reasons. Types it does
// not know at all (OpenAI's own input_audio_buffer.timeout_triggered, say) are not reported.
const path = require("node:path");
const events = require(path.join(__dirname,
  "node_modules/@openai/agents-realtime/dist/openaiRealtimeEvents.js"));

let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  const refused = [];
  for (const event of JSON.parse(input)) {
    const parsed = events.realtimeServerEventSchema.safeParse(event);
    const unknown = !parsed.success && parsed.error.issues.every(
      (issue) => issue.code === "invalid_union" && issue.note === "No matching discriminator");
    if (!parsed.success && !unknown) {
      refused.push({ type: event.type, issues: parsed.error.issues.slice(0, 3) });
    }
  }
  process.stdout.write(JSON.stringify(refused));
});
