// The Vercel AI SDK with its defaults against a live Tokentill server: `openai(model)` from
// createOpenAI({baseURL, apiKey}) is the Responses API. Run by tests/test_sdk_protocols.py:
//   BASE_URL=… API_KEY=… MODEL=… node vercel.mjs <scenario>
// Prints one JSON object: what the SDK returned, or {"error": …} (and exits 1).
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";

const openai = createOpenAI({ baseURL: process.env.BASE_URL, apiKey: process.env.API_KEY });
const model = openai(process.env.MODEL);

const weather = tool({
  description: "The weather in a city",
  inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"] }),
  execute: async ({ city }) => `sunny in ${city}`,
});

const scenarios = {
  async generate() {
    const result = await generateText({ model, prompt: "Say pong" });
    return { text: result.text, usage: result.usage, finishReason: result.finishReason };
  },
  async stream() {
    const result = streamText({ model, prompt: "Say pong", onError: ({ error }) => { throw error; } });
    let text = "";
    for await (const delta of result.textStream) text += delta;
    return { text, usage: await result.usage, finishReason: await result.finishReason };
  },
  // A multi-step tool run with the defaults, then with the provider option a stateless gateway
  // needs once a step answers text beside its tool call (docs/api.md).
  async tools() {
    return toolRun(undefined);
  },
  async "tools-store-false"() {
    return toolRun({ openai: { store: false } });
  },
};

async function toolRun(providerOptions) {
  const result = await generateText({
    model,
    prompt: "What is the weather in Paris?",
    tools: { weather },
    stopWhen: stepCountIs(4),
    providerOptions,
  });
  return { text: result.text, steps: result.steps.length, usage: result.totalUsage };
}

try {
  console.log(JSON.stringify(await scenarios[process.argv[2]]()));
} catch (error) {
  console.log(JSON.stringify({ error: String(error?.message ?? error), status: error?.statusCode ?? null }));
  process.exit(1);
}
