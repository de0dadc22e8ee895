// The two runtimes that answer the page, and the pictures they are given.
//
// In this browser: onnxruntime-web runs the model the site holds (site.json names the model and
// the runtime's files; the web stage writes them) on the input digits.js makes, as
// pipeline/digits.py does. On our service: POST digit with the picture's bytes, when the page came
// from it. Each runtime's classify(picture) answers {probabilities, timing, inferenceMs}; the
// browser's also gives the input and the logits, which tests/test_browser.py checks against the
// pipeline's, and the pre-processing time (benchmarks/web_inference.py measures both).
import {toInput, ImageError, MAX_PIXELS} from "./digits.js";

/** A failure the user can cause or fix (no WebAssembly, a model that does not load): said on the page as it is. */
export class PageError extends Error {}

// ---------------------------------------------------------------------------- the two runtimes

/**
 * onnxruntime-web on WebAssembly, with the model this site serves. One thread: more need
 * SharedArrayBuffer, which browsers give only to pages served with cross-origin isolation
 * headers (COOP and COEP), and a plain static host does not send them; with one thread the
 * page runs the same on every host, and a 28x28 digit needs no more.
 */
export async function loadBrowserRuntime() {
  if (typeof WebAssembly !== "object") {
    throw new PageError("This browser has no WebAssembly, which onnxruntime-web needs to run the model here.");
  }
  const found = await fetch("site.json", {cache: "no-cache"});  // what is deployed now, not a cached copy
  if (!found.ok) throw new PageError(`onnxruntime-web is not on this host (site.json: HTTP ${found.status}).`);
  const site = await found.json();
  const ort = await import(new URL(site.runtime.module, location.href).href);
  ort.env.wasm.numThreads = 1;
  let session;
  try {
    const model = await fetch(`${site.model.file}?sha256=${site.model.sha256}`);  // a new model, a new URL: never stale
    if (!model.ok) throw new Error(`HTTP ${model.status}`);
    session = await ort.InferenceSession.create(new Uint8Array(await model.arrayBuffer()),
                                                {executionProviders: ["wasm"]});
  } catch (e) {
    throw new PageError(`The model could not be loaded in this browser (${site.model.file}): ${e.message || e}`);
  }
  const input = x => ({[session.inputNames[0]]: new ort.Tensor("float32", x, [1, 1, 28, 28])});
  await session.run(input(new Float32Array(28 * 28)));  // the first run plans memory: not the user's to wait for
  const label = `this browser: onnxruntime-web ${site.runtime.version} (WebAssembly, 1 thread)`;
  return {
    label, version: `${site.model.name} version ${site.model.sha256.slice(0, 12)} (${site.model.precision})`,
    async classify(picture) {
      const t0 = performance.now();
      const x = toInput(picture.rgba, picture.width, picture.height);
      const t1 = performance.now();
      const outputs = await session.run(input(x));
      const t2 = performance.now();
      const logits = Array.from(outputs[session.outputNames[0]].data);
      return {probabilities: softmax(logits), logits, input: x,
              timing: `inference ${ms(t2 - t1)}, pre-processing ${ms(t1 - t0)}`,
              inferenceMs: t2 - t1, preprocessingMs: t1 - t0};
    },
  };
}

/** Our service, when this page came from it: it answers POST digit with the picture's bytes. */
export async function reachService() {
  let health;
  try {
    health = await fetch("v2/health/ready");
  } catch (e) {
    throw new PageError(`Our service is not reachable from this page (${e.message || e}).`);
  }
  if (!health.ok) {
    throw new PageError(`Our service is not reachable from this page (v2/health/ready: HTTP ${health.status}).`);
  }
  return {
    label: `our service (POST ${new URL("digit", location.href).pathname})`, version: "",
    async classify(picture) {
      const t0 = performance.now();
      const response = await fetch("digit", {method: "POST", body: picture.blob,
                                             headers: {"Content-Type": picture.blob.type || "image/png"}});
      const result = await response.json().catch(() => ({}));  // a host that is not our service: no JSON
      const t1 = performance.now();
      if (!response.ok) throw new PageError(result.error || `our service answered HTTP ${response.status}`);
      this.version = `${result.model_name} version ${result.model_version}`;
      return {probabilities: result.probabilities, timing: `round trip ${ms(t1 - t0)}, inference included`,
              inferenceMs: t1 - t0};
    },
  };
}

/**
 * An image file's own pixels, upright: the EXIF orientation applied as Pillow's exif_transpose
 * does, no colour management (Pillow does none), alpha kept apart from the colour.
 */
export async function decodeImage(blob) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob, {imageOrientation: "from-image", premultiplyAlpha: "none",
                                            colorSpaceConversion: "none"});
  } catch {
    throw new ImageError(`not an image: this browser cannot decode ${blob.name ? `"${blob.name}"` : "what was pasted"} ` +
                         "as PNG, JPEG or another picture format");
  }
  if (bitmap.width * bitmap.height > MAX_PIXELS) {
    throw new ImageError(`image is ${bitmap.width}x${bitmap.height}; at most ${MAX_PIXELS.toLocaleString("en")} pixels`);
  }
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [bitmap.width, bitmap.height];
  const c = canvas.getContext("2d", {willReadFrequently: true});
  c.drawImage(bitmap, 0, 0);
  return {rgba: c.getImageData(0, 0, bitmap.width, bitmap.height).data, width: bitmap.width, height: bitmap.height,
          blob, bitmap};
}

function ms(t) { return `${t.toFixed(1)} ms`; }

function softmax(logits) {  // as pipeline.evaluate.softmax: the largest logit taken off first
  const top = Math.max(...logits);
  const e = logits.map(v => Math.exp(v - top));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map(v => v / sum);
}
