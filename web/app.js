// Runs a momentprop regression file (1-D input) with onnxruntime-web and draws mean ± 2 std.
// URL parameters: model (default toy_regression.onnx), data (default toy_data.json; the points drawn),
// from, to, points (the x grid, default -6, 6, 241), every (table rows: every n-th grid point, default 20).
"use strict";

const params = new URLSearchParams(location.search);
const modelUrl = params.get("model") || "toy_regression.onnx";
const dataUrl = params.get("data") || "toy_data.json";
const from = Number(params.get("from") || -6), to = Number(params.get("to") || 6);
const points = Number(params.get("points") || 241), every = Number(params.get("every") || 20);

ort.env.wasm.numThreads = 1;  // threads need cross-origin isolation headers that a plain static server does not send
ort.env.wasm.wasmPaths = new URL("node_modules/onnxruntime-web/dist/", location.href).href;

function setStatus(text, error = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = error ? "error" : "";
}

async function trainingPoints() {
  try {
    const response = await fetch(dataUrl);
    return response.ok ? await response.json() : { x: [], y: [] };
  } catch (e) {
    return { x: [], y: [] };
  }
}

function draw(result, data) {
  const canvas = document.getElementById("plot"), g = canvas.getContext("2d");
  const { x, mean, std, predictiveStd } = result;
  const lo = Math.min(...mean.map((m, i) => m - 2 * predictiveStd[i]), ...data.y);
  const hi = Math.max(...mean.map((m, i) => m + 2 * predictiveStd[i]), ...data.y);
  const px = (v) => 40 + ((v - from) / (to - from)) * (canvas.width - 60);
  const py = (v) => canvas.height - 30 - ((v - lo) / (hi - lo)) * (canvas.height - 50);
  g.clearRect(0, 0, canvas.width, canvas.height);
  const band = (s, colour) => {
    g.beginPath();
    x.forEach((v, i) => g.lineTo(px(v), py(mean[i] + 2 * s[i])));
    for (let i = x.length - 1; i >= 0; i--) g.lineTo(px(x[i]), py(mean[i] - 2 * s[i]));
    g.closePath();
    g.fillStyle = colour;
    g.fill();
  };
  band(predictiveStd, "rgba(31,119,180,0.15)");
  band(std, "rgba(31,119,180,0.35)");
  g.beginPath();
  x.forEach((v, i) => g.lineTo(px(v), py(mean[i])));
  g.strokeStyle = "#1f77b4";
  g.lineWidth = 2;
  g.stroke();
  g.fillStyle = "#d62728";
  data.x.forEach((v, i) => { g.beginPath(); g.arc(px(v), py(data.y[i]), 3, 0, 2 * Math.PI); g.fill(); });
  g.fillStyle = "#555";
  g.font = "12px sans-serif";
  for (let t = Math.ceil(from); t <= to; t += 2) g.fillText(String(t), px(t) - 4, canvas.height - 10);
  g.fillText(hi.toFixed(1), 4, py(hi) + 10);
  g.fillText(lo.toFixed(1), 4, py(lo));
}

function table(result) {
  const body = document.querySelector("#values tbody");
  body.innerHTML = "";
  for (let i = 0; i < result.x.length; i += every) {
    const row = document.createElement("tr");
    for (const v of [result.x[i], result.mean[i], result.std[i], result.predictiveStd[i]]) {
      const cell = document.createElement("td");
      cell.textContent = v.toPrecision(7);
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
}

async function main() {
  const session = await ort.InferenceSession.create(modelUrl, { executionProviders: ["wasm"] });
  const x = Float32Array.from({ length: points }, (_, i) => from + ((to - from) * i) / (points - 1));
  const feeds = { [session.inputNames[0]]: new ort.Tensor("float32", x, [points, 1]) };
  const started = performance.now();
  const out = await session.run(feeds);
  const ms = performance.now() - started;
  const noisy = out.predictive_variance || out.variance;  // no likelihood: the latent variance only
  const result = {
    x: Array.from(x),
    mean: Array.from(out.mean.data),
    std: Array.from(out.variance.data, Math.sqrt),
    predictiveStd: Array.from(noisy.data, Math.sqrt),
    outputs: session.outputNames,
    ms,
  };
  draw(result, await trainingPoints());
  table(result);
  setStatus(`${modelUrl}: ${points} inputs in one call, ${ms.toFixed(1)} ms (onnxruntime-web ${(ort.env.versions && ort.env.versions.web) || ""}, wasm)`);
  window.momentprop = { ...result, done: true };
}

main().catch((e) => {
  setStatus(`error: ${e.message || e}`, true);
  window.momentprop = { done: true, error: String(e.message || e) };
});
