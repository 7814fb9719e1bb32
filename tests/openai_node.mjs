// The official Node client (`openai` on npm) against a real `easel serve` (tests/test_openai.py runs
// it with NODE_PATH at the installed package). Env: EASEL_BASE (http://host:port), EASEL_KEY (an
// API-key project's key), EASEL_FG / EASEL_BG (image files for the IC-Light edit). Prints one JSON
// object with what each call returned or raised; the Python test asserts on it.
import fs from "node:fs";
import OpenAI, { toFile } from "openai";

const server = process.env.EASEL_BASE;
const key = process.env.EASEL_KEY;
const out = {};

async function caught(fn) {
  try {
    await fn();
    return { raised: null };
  } catch (e) {
    return { raised: e.constructor.name, status: e.status ?? null, param: e.param ?? null, code: e.code ?? null,
             isApiError: e instanceof OpenAI.APIError };
  }
}

// snippet: node-generate
const client = new OpenAI({ baseURL: `${server}/v1`, apiKey: key, maxRetries: 0 });
const result = await client.images.generate({
  model: "sd-lora", prompt: "a lighthouse at dusk", n: 2, size: "64x64", response_format: "b64_json",
  // Easel's own tool fields (extra_body in Python) go in the same object
  steps: 2, seed: "42", selectedLoraModel: [], clipSkip: 0,
});
const images = result.data.map((d) => Buffer.from(d.b64_json, "base64"));
// end snippet
out.generate = { n: images.length, png: images.map((b) => b.subarray(1, 4).toString()), created: result.created };

const flux = await client.images.generate({
  model: "flux-lora-fast", prompt: "a lion", n: 2, size: "64x64", response_format: "url", steps: 2, seed: "7",
});
out.flux = { urls: flux.data.map((d) => d.url) };

// snippet: node-edit
const edited = await client.images.edit({
  model: "ic-light",
  image: [await toFile(fs.readFileSync(process.env.EASEL_FG), "person.png", { type: "image/png" }),
          await toFile(fs.readFileSync(process.env.EASEL_BG), "street.png", { type: "image/png" })],
  prompt: "a woman, sunset", response_format: "b64_json",
  // Easel's own IC-Light fields
  steps: 2, seed: "7", highres_scale: 1.5,
});
// end snippet
out.edit = { n: edited.data.length, png: Buffer.from(edited.data[0].b64_json, "base64").subarray(1, 4).toString() };

// snippet: node-stream
const stream = await client.images.generate({
  model: "sd-lora", prompt: "a red fish", size: "64x64", stream: true, partial_images: 2,
  steps: 10, seed: "42", selectedLoraModel: [], clipSkip: 0,
});
for await (const event of stream) {
  if (event.type === "image_generation.partial_image") {
    console.error(`partial image ${event.partial_image_index}: ${event.b64_json.length} base64 characters`);
  } else if (event.type === "image_generation.completed") {
    fs.writeFileSync(process.env.EASEL_OUT ?? "fish.png", Buffer.from(event.b64_json, "base64"));
  }
}
// end snippet
out.stream = fs.existsSync(process.env.EASEL_OUT ?? "fish.png");

out.badSize = await caught(() => client.images.generate({ model: "sd-lora", prompt: "x", size: "big" }));
out.unknownModel = await caught(() => client.images.generate({ model: "dall-e-3", prompt: "x" }));
// the client refuses to start without a key: leave its Authorization header out of one request
out.missingKey = await caught(() => client.images.generate({ model: "sd-lora", prompt: "x" },
                                                           { headers: { Authorization: null } }));
out.models = (await client.models.list()).data.map((m) => m.id);
console.log(JSON.stringify(out));
