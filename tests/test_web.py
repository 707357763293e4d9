"""The browser page (web/): served on localhost, run by Debian's Chromium headless through Playwright; the numbers it
shows must equal ONNX Runtime's in Python on the same file and inputs. Needs chromium and web/node_modules
(`.ci/run` installs both); skipped with the reason when either is missing."""

from __future__ import annotations

import functools
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
