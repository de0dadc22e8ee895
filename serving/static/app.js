// The drawing page: a picture in (drawn, opened or pasted), the digit and its probabilities out,
// from the runtime chosen (runtimes.js: this browser, or our service), said with how long it took.
import {decodeImage, loadBrowserRuntime, reachService} from "./runtimes.js";

const $ = id => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d", {willReadFrequently: true});
const ui = {answer: $("answer"), status: $("status"), bars: $("bars"), runtime: $("runtime"), version: $("version"),
            runtimes: $("runtimes")};

const runtimes = {browser: null, service: null};  // each a promise of a runtime, made when first needed
const NAMES = {browser: "this browser", service: "our service"};
let chosen = "browser";

function runtime(name) {
  runtimes[name] ??= name === "browser" ? loadBrowserRuntime() : reachService();
  return runtimes[name];
}

/** Make ``name`` the runtime that answers; if it can't be had, say why and answer with the other. */
async function choose(name) {
  const other = name === "browser" ? "service" : "browser";
  try {
    use(name, await runtime(name));
  } catch (e) {
    disable(name, e.message);
    try {
      use(other, await runtime(other));
      say(`${e.message} Answers come from ${NAMES[other]}.`, true);
    } catch (e2) {
      disable(other, e2.message);
      ui.runtimes.dataset.ready = "none";
      say(`${e.message} ${e2.message}`, true);
    }
  }
}

function use(name, r) {
  chosen = name;
  ui.runtimes.querySelector(`input[value="${name}"]`).checked = true;
  ui.runtimes.dataset.ready = name;
  ui.version.textContent = r.version;
}

function disable(name, why) {
  const radio = ui.runtimes.querySelector(`input[value="${name}"]`);
  radio.disabled = true;
  radio.parentElement.title = why;
}

let ready = choose("browser");  // settles once a runtime is chosen (or none can be)
ui.runtimes.addEventListener("change", e => {
  ready = choose(e.target.value);
  const asked = e.target.value;
  ready.then(() => { if (!empty && chosen === asked) classifySoon(); });  // the same picture, by the other runtime
});

// ---------------------------------------------------------------------------- the picture

let picture = null;  // an opened or pasted image, until the pad is drawn on; null: the pad is the picture
let empty = true;  // nothing drawn or opened since the last clear

/** The picture to classify: {rgba, width, height, blob} (blob: the bytes our service gets). */
async function currentPicture() {
  if (picture) return picture;
  const blob = await new Promise(resolve => pad.toBlob(resolve, "image/png"));
  return {rgba: ctx.getImageData(0, 0, pad.width, pad.height).data, width: pad.width, height: pad.height, blob};
}

/** Show an opened or pasted image on the pad (fitted, on white) and classify its own pixels. */
async function openImage(blob) {
  pad.dataset.state = "busy";
  try {
    picture = await decodeImage(blob);
  } catch (e) {
    picture = null;
    showNothing();
    say(e.message, true);
    pad.dataset.state = "idle";
    return;
  }
  const {bitmap} = picture;
  empty = false;
  const fit = Math.min(pad.width / bitmap.width, pad.height / bitmap.height);
  blank();
  ctx.drawImage(bitmap, (pad.width - bitmap.width * fit) / 2, (pad.height - bitmap.height * fit) / 2,
                bitmap.width * fit, bitmap.height * fit);
  classifySoon();
}
$("file").addEventListener("change", e => { if (e.target.files[0]) openImage(e.target.files[0]); });
document.addEventListener("paste", e => {
  const item = [...(e.clipboardData?.items || [])].find(i => i.kind === "file");
  if (item) openImage(item.getAsFile());
});

// ---------------------------------------------------------------------------- drawing: pointer events cover mouse, pen and touch

let drawing = false, last = null, dirty = false;

function blank() { ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, pad.width, pad.height); }

function point(e) {
  const r = pad.getBoundingClientRect();
  return {x: (e.clientX - r.left) * pad.width / r.width, y: (e.clientY - r.top) * pad.height / r.height};
}

function stroke(a, b) {
  ctx.strokeStyle = "#000"; ctx.lineWidth = 20; ctx.lineCap = "round"; ctx.lineJoin = "round";
  ctx.beginPath(); ctx.moveTo(a.x, a.y); ctx.lineTo(b.x, b.y); ctx.stroke();
  dirty = true; empty = false;
  picture = null;  // what is on the pad now is the picture
}

pad.addEventListener("pointerdown", e => {
  drawing = true; last = point(e); stroke(last, last);
  pad.setPointerCapture?.(e.pointerId);
});
pad.addEventListener("pointermove", e => { if (!drawing) return; const p = point(e); stroke(last, p); last = p; });
["pointerup", "pointercancel"].forEach(t => pad.addEventListener(t, () => { drawing = false; classifySoon(); }));
setInterval(() => { if (drawing && dirty) classifySoon(); }, 150);  // live answers while drawing

$("clear").addEventListener("click", () => { picture = null; empty = true; blank(); showNothing(); say("Draw a digit."); });

// ---------------------------------------------------------------------------- classifying: at most one at a time

let busy = false, again = false;

async function classifySoon() {
  if (busy) { again = true; return; }
  busy = true; dirty = false;
  pad.dataset.state = "busy";  // "idle" once the latest picture has its answer (or its error)
  try {
    await ready;
    const name = chosen, r = await runtime(name);
    show(await r.classify(await currentPicture()), r, name);
  } catch (e) {
    showNothing();
    say(e.message, true);
  } finally {
    busy = false;
    if (again) { again = false; classifySoon(); } else { pad.dataset.state = "idle"; }
  }
}

// ---------------------------------------------------------------------------- showing the answer

const rows = [];  // the bar chart: one row per digit, built once
for (let d = 0; d < 10; d++) {
  const label = document.createElement("span"); label.textContent = d;
  const track = document.createElement("div"); track.className = "track";
  const bar = document.createElement("div"); bar.className = "bar"; bar.dataset.digit = d;
  track.appendChild(bar);
  const pct = document.createElement("span"); pct.className = "pct";
  ui.bars.append(label, track, pct);
  rows.push({bar, pct});
}

function show(result, r, name) {
  const p = result.probabilities;
  const digit = p.indexOf(Math.max(...p));
  ui.answer.textContent = digit;
  ui.answer.dataset.digit = digit;
  say(`Confidence ${(100 * p[digit]).toFixed(1)}%`);
  ui.runtime.textContent = `Answered by ${r.label}: ${result.timing}.`;
  ui.runtime.dataset.runtime = name;
  ui.runtime.dataset.inferenceMs = result.inferenceMs;
  ui.version.textContent = r.version;
  p.forEach((v, d) => {
    rows[d].bar.style.width = `${(100 * v).toFixed(1)}%`;
    rows[d].bar.classList.toggle("top", d === digit);
    rows[d].bar.dataset.probability = v;
    rows[d].pct.textContent = `${(100 * v).toFixed(1)}%`;
  });
}

function showNothing() {
  ui.answer.textContent = ""; ui.answer.dataset.digit = "";
  ui.runtime.textContent = ""; ui.runtime.dataset.runtime = "";
  rows.forEach(r => { r.bar.style.width = "0"; r.bar.classList.remove("top"); r.pct.textContent = ""; delete r.bar.dataset.probability; });
}

let said = false;  // anything said since the page loaded

function say(text, error = false) {
  said = true;
  ui.status.textContent = text;
  ui.status.classList.toggle("error", error);
}

blank();
ready.then(() => {
  if (!said) say("Draw a digit.");
  if (!busy) pad.dataset.state = "idle";
});
