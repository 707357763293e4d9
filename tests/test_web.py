"""The browser page (web/): served on localhost, run by Debian's Chromium headless through Playwright; the numbers it
shows must equal ONNX Runtime's in Python on the same file and inputs. Needs chromium and web/node_modules
(`.ci/run` installs both); skipped with the reason when either is missing."""

from __future__ import annotations

import functools
import json
import importlib.util
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from momentprop.onnx_runner import OnnxRunner

WEB = Path(__file__).resolve().parents[1] / "web"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,  # about 11 s: starts Chromium
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)"),
    pytest.mark.skipif(not (WEB / "node_modules" / "onnxruntime-web").is_dir(),
                       reason="web/node_modules is missing (cd web && npm ci)"),
]


class Handler(SimpleHTTPRequestHandler):
    """Serves web/, and /model/<name> from the test's folder."""

    model_dir: Path

    def translate_path(self, path: str) -> str:
        if path.startswith("/model/"):
            return str(self.model_dir / Path(path.split("?")[0]).name)
        return super().translate_path(path)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    spec = importlib.util.spec_from_file_location("make_toy_model", WEB / "make_toy_model.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    toy.write(tmp_path, "toy.onnx")
    handler = functools.partial(type("H", (Handler,), {"model_dir": tmp_path}), directory=str(WEB))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path
    httpd.shutdown()


def test_page_shows_onnx_runtime_numbers(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the test extra)")
    url, folder = server
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 1000})
            page.goto(f"{url}/index.html?model=/model/toy.onnx&data=/model/toy_data.json")
            page.wait_for_function("window.momentprop && window.momentprop.done", timeout=30_000)
            result = page.evaluate("window.momentprop")
            assert "error" not in result, result["error"]
            cells = page.eval_on_selector_all(
                "#values tbody tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))"
            )
            page.screenshot(path=str(folder / "page.png"), full_page=True)
        finally:
            browser.close()
    assert (folder / "page.png").stat().st_size > 10_000
    x = np.asarray(result["x"], np.float32)[:, None]
    expected = OnnxRunner(folder / "toy.onnx")(x)
    np.testing.assert_allclose(result["mean"], expected["mean"][:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result["std"], np.sqrt(expected["variance"][:, 0]), rtol=1e-5)
    np.testing.assert_allclose(result["predictiveStd"], np.sqrt(expected["predictive_variance"][:, 0]), rtol=1e-5)
    shown = np.asarray(cells, np.float64)  # the table: every 20th grid point, 7 significant digits
    assert shown.shape == (13, 4)
    rows = np.arange(0, len(x), 20)
    reference = np.c_[x[rows, 0], expected["mean"][rows, 0], np.sqrt(expected["variance"][rows, 0]),
                      np.sqrt(expected["predictive_variance"][rows, 0])]
    np.testing.assert_allclose(shown, reference, rtol=2e-6, atol=1e-6)


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    """web/make_image_model.py at a smaller size (3,000 training images, one epoch)."""
    from benchmarks.evaluate.data import fashion_mnist_available

    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    pytest.importorskip("laplace")
    spec = importlib.util.spec_from_file_location("make_image_model", WEB / "make_image_model.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    folder = tmp_path_factory.mktemp("image_page")
    facts = maker.write(folder, train=3000, epochs=1)
    return folder, facts


def test_image_page_shows_onnx_runtime_numbers_for_each_file(image_model):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (in the test extra)")
    folder, facts = image_model
    assert facts["files"]["fashion_lenet.ort"]["max_prob_error"] < 1e-5
    handler = functools.partial(type("H", (Handler,), {"model_dir": folder}), directory=str(WEB))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    samples = json.loads((folder / "fashion_samples.json").read_text())
    images = np.asarray(samples["images"], np.float32).reshape(-1, 1, 28, 28)
    shown = {}
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 800})
                for name in ("fashion_lenet.onnx", "fashion_lenet.ort", "fashion_lenet.int8.onnx"):
                    page.goto(f"{url}/classify.html?model=/model/{name}&samples=/model/fashion_samples.json&auto=1")
                    page.wait_for_function("window.momentprop && window.momentprop.done", timeout=60_000)
                    shown[name] = page.evaluate("window.momentprop")
                    assert "error" not in shown[name], shown[name]["error"]
                    if name.endswith(".onnx") and "int8" not in name:
                        rows = page.eval_on_selector_all("#top tbody tr",
                                                         "rows => rows.map(r => r.cells[0].textContent)")
                        entropy_text = page.text_content("#entropy")
                        page.screenshot(path=str(folder / "classify.png"), full_page=True)
            finally:
                browser.close()
    finally:
        httpd.shutdown()
    assert (folder / "classify.png").stat().st_size > 10_000
    for name, result in shown.items():
        expected = OnnxRunner(folder / name)(images)
        k = expected["probs"].shape[1]
        logit_var = np.diagonal(expected["covariance"], axis1=1, axis2=2) if "covariance" in expected else (
            expected["variance"])
        # int8: onnxruntime-web's and the x86 build's dynamic quantisation kernels round differently (measured up
        # to 0.006 in a probability); float32 files agree to float rounding
        rtol, atol = (0.0, 0.02) if "int8" in name else (1e-4, 1e-6)
        probs = np.asarray([r["probs"] for r in result["results"]])
        np.testing.assert_allclose(probs, expected["probs"], rtol=rtol, atol=atol, err_msg=name)
        np.testing.assert_allclose([r["logitStd"] for r in result["results"]], np.sqrt(logit_var), rtol=rtol + 1e-4,
                                   atol=10 * atol, err_msg=name)
        entropy = -(expected["probs"] * np.log(expected["probs"])).sum(1)
        np.testing.assert_allclose([r["entropy"] for r in result["results"]], entropy, rtol=1e-4, atol=5 * atol,
                                   err_msg=name)
        assert probs.shape == (len(images), k)
    # the page shows the first sample's top class first, and its entropy
    first = shown["fashion_lenet.onnx"]["results"][0]
    assert rows[0] == samples["classes"][int(np.argmax(first["probs"]))]
    assert f"{first['entropy']:.3f} nats" in entropy_text
