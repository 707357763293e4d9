// Runs a momentprop image classifier (input (N, 1, 28, 28), pixels in [0, 1]; outputs mean and covariance or
// variance of the logits, probs) with onnxruntime-web: the top classes with their probabilities and the spread of
// their scores, and the predictive entropy.
// URL parameters: model (default fashion_lenet.onnx; the choices: fashion_lenet.onnx, .ort, .int8.onnx),
// samples (default fashion_samples.json), auto=1 (classify every sample image once, then set window.momentprop).
"use strict";

const params = new URLSearchParams(location.search);
const samplesUrl = params.get("samples") || "fashion_samples.json";
const FILES = ["fashion_lenet.onnx", "fashion_lenet.ort", "fashion_lenet.int8.onnx"];
const SIDE = 28, TOP = 3;

ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation headers that a plain static server does not send
ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", location.href).href;

let session = null, classes = [];

function setStatus(text, error = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = error ? "error" : "";
}

// Predictive entropy of the class probabilities, in nats.
function entropy(p) {
  return -p.reduce((s, q) => s + (q > 0 ? q * Math.log(q) : 0), 0);
}

// One image (Float32Array of 784 pixels in [0, 1]) -> {probs, logitStd, entropy}.
async function classify(pixels) {
  const input = new ort.Tensor("float32", pixels, [1, 1, SIDE, SIDE]);
  const out = await session.run({ [session.inputNames[0]]: input });
  const k = out.probs.dims[1];
  const logitVar = out.covariance
    ? Array.from({ length: k }, (_, i) => out.covariance.data[i * k + i])  // the diagonal of the 10 x 10 covariance
    : Array.from(out.variance.data);
  const probs = Array.from(out.probs.data);
  return { probs, mean: Array.from(out.mean.data), logitStd: logitVar.map(Math.sqrt), entropy: entropy(probs) };
}

function show(result, truth) {
  const order = result.probs.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, TOP);
  const body = document.querySelector("#top tbody");
  body.innerHTML = "";
  for (const [p, i] of order) {
    const row = document.createElement("tr");
    const cells = [classes[i] || `class ${i}`, p.toFixed(3),
                   `${result.mean[i].toFixed(2)} ± ${result.logitStd[i].toFixed(2)}`];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.appendChild(cell);
    }
    const bar = document.createElement("td");
    bar.innerHTML = `<span class="bar" style="width:${(120 * p).toFixed(0)}px"></span>`;
    row.appendChild(bar);
    body.appendChild(row);
  }
  const maxEntropy = Math.log(result.probs.length);
  document.getElementById("entropy").textContent =
    `predictive entropy ${result.entropy.toFixed(3)} nats (0 = certain, ${maxEntropy.toFixed(2)} = uniform)`;
  document.getElementById("truth").textContent = truth === undefined ? "" : `true class: ${classes[truth]}`;
}

// The pad (280 x 280, white on black) averaged down to 28 x 28 pixels in [0, 1].
function padPixels() {
  const small = document.createElement("canvas");
  small.width = small.height = SIDE;
  const g = small.getContext("2d");
  g.drawImage(document.getElementById("pad"), 0, 0, SIDE, SIDE);
  const rgba = g.getImageData(0, 0, SIDE, SIDE).data;
  return Float32Array.from({ length: SIDE * SIDE }, (_, i) => rgba[4 * i] / 255);
}

function drawPixels(pixels) {
  const pad = document.getElementById("pad"), g = pad.getContext("2d");
  const small = document.createElement("canvas");
  small.width = small.height = SIDE;
  const image = small.getContext("2d").createImageData(SIDE, SIDE);
  pixels.forEach((v, i) => { image.data.set([255 * v, 255 * v, 255 * v, 255], 4 * i); });
  small.getContext("2d").putImageData(image, 0, 0);
  g.imageSmoothingEnabled = false;
  g.drawImage(small, 0, 0, pad.width, pad.height);
}

// A dropped picture: grey levels, and inverted when its border is light (Fashion-MNIST items are light on black).
function pictureOnPad(img) {
  const pad = document.getElementById("pad"), g = pad.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, pad.width, pad.height);
  const scale = Math.min(pad.width / img.width, pad.height / img.height);
  g.drawImage(img, (pad.width - img.width * scale) / 2, (pad.height - img.height * scale) / 2,
              img.width * scale, img.height * scale);
  const data = g.getImageData(0, 0, pad.width, pad.height), px = data.data;
  let border = 0, n = 0;
  for (let y = 0; y < pad.height; y++) {
    for (let x = 0; x < pad.width; x++) {
      const i = 4 * (y * pad.width + x), grey = (px[i] + px[i + 1] + px[i + 2]) / 3;
      px[i] = px[i + 1] = px[i + 2] = grey;
      if (x < 4 || y < 4 || x >= pad.width - 4 || y >= pad.height - 4) { border += grey; n++; }
    }
  }
  if (border / n > 127) for (let i = 0; i < px.length; i += 4) px[i] = px[i + 1] = px[i + 2] = 255 - px[i];
  g.putImageData(data, 0, 0);
}

async function classifyPad(truth) {
  show(await classify(padPixels()), truth);
}

function setUpPad() {
  const pad = document.getElementById("pad"), g = pad.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, pad.width, pad.height);
  let drawing = false;
  const at = (e) => { const r = pad.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
  pad.addEventListener("pointerdown", (e) => { drawing = true; g.beginPath(); g.moveTo(...at(e)); });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing) return;
    g.lineTo(...at(e));
    g.strokeStyle = "#fff";
    g.lineWidth = 22;
    g.lineCap = g.lineJoin = "round";
    g.stroke();
  });
  pad.addEventListener("pointerup", () => { drawing = false; classifyPad(); });
  document.getElementById("clear").addEventListener("click", () => {
    g.fillStyle = "#000";
    g.fillRect(0, 0, pad.width, pad.height);
  });
  const drop = document.getElementById("drop");
  const load = (file) => {
    const img = new Image();
    img.onload = () => { pictureOnPad(img); classifyPad(); };
    img.src = URL.createObjectURL(file);
  };
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files.length) load(e.dataTransfer.files[0]);
  });
  document.getElementById("pick").addEventListener("change", (e) => { if (e.target.files.length) load(e.target.files[0]); });
}

function thumbnail(pixels) {
  const c = document.createElement("canvas");
  c.width = c.height = SIDE;
  const image = c.getContext("2d").createImageData(SIDE, SIDE);
  pixels.forEach((v, i) => { image.data.set([255 * v, 255 * v, 255 * v, 255], 4 * i); });
  c.getContext("2d").putImageData(image, 0, 0);
  return c.toDataURL();
}

async function openModel(url) {
  const started = performance.now();
  session = await ort.InferenceSession.create(url, { executionProviders: ["wasm"] });
  setStatus(`${url}: loaded in ${(performance.now() - started).toFixed(0)} ms (onnxruntime-web, wasm); outputs ` +
            session.outputNames.join(", "));
}

async function main() {
  const modelUrl = params.get("model") || FILES[0];
  const select = document.getElementById("file");
  for (const name of new Set([modelUrl, ...FILES])) select.add(new Option(name, name));
  select.value = modelUrl;
  await openModel(modelUrl);
  select.addEventListener("change", async () => { await openModel(select.value); await classifyPad(); });
  setUpPad();
  const samples = await (await fetch(samplesUrl)).json();
  classes = samples.classes;
  const gallery = document.getElementById("samples");
  const pick = async (img, i) => {
    gallery.querySelectorAll("img").forEach((other) => other.classList.remove("active"));
    img.classList.add("active");
    drawPixels(samples.images[i]);
    show(await classify(Float32Array.from(samples.images[i])), samples.labels[i]);
  };
  samples.images.forEach((pixels, i) => {
    const img = document.createElement("img");
    img.src = thumbnail(pixels);
    img.title = classes[samples.labels[i]];
    img.addEventListener("click", () => pick(img, i));
    gallery.appendChild(img);
  });
  const results = [];
  if (params.get("auto")) {
    for (const pixels of samples.images) results.push(await classify(Float32Array.from(pixels)));
  }
  await pick(gallery.querySelector("img"), 0);
  window.momentprop = { results, done: true };
}

main().catch((e) => {
  setStatus(`error: ${e.message || e}`, true);
  window.momentprop = { done: true, error: String(e.message || e) };
});
