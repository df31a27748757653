"""The browser viewer (issue 32): the server (tiles, bounds, path traversal, a missing or changed slide, the
token), the console script, the batch's report.html, and the page itself in headless Chromium (Debian's
chromium and chromium-driver, driven by Selenium; skipped with a reason where they are not installed)."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from tests.test_cli_commands import ok, wsi_dala
from wsi_dala.model import write_untrained_checkpoint
from wsi_dala.model.colour import CLASS_NAMES
from wsi_dala.slides.synthetic import TUMOUR, SyntheticSlideSpec, write_synthetic_slide

pytest.importorskip("flask")
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A batch of two slides with planted tumour, run with the colour scorer."""
    root = tmp_path_factory.mktemp("viewer")
    slides = {}
    for i in range(2):
        spec = SyntheticSlideSpec(width=3072, height=2048, mpp=0.5, seed=140 + i, app_mag=20, tumour_regions=2)
        slides[f"v{i}"] = write_synthetic_slide(root / "archive" / f"v{i}.svs", spec)
    model = write_untrained_checkpoint(root / "colour.safetensors", "colour-reference", 64, 1.0, CLASS_NAMES)
    ok(wsi_dala("batch", root / "archive", "--out", root / "batch", "--model", model, "-q", timeout_s=300))
    return root / "batch", slides


def _client(folder: Path, token: str | None = None):
    from wsi_dala.viewer.app import create_app

    return create_app(folder, token).test_client()


def _run_id(batch_out: Path, stem: str) -> str:
    return next(p.name for p in batch_out.iterdir() if p.name.startswith(f"{stem}-"))


def test_the_server_serves_tiles_layers_and_measurements_and_nothing_else(batch):
    out, _ = batch
    client = _client(out)
    run = _run_id(out, "v0")
    index = client.get("/")
    assert index.status_code == 200 and b"v0" in index.data and b"v1" in index.data
    info = client.get(f"/run/{run}/info.json").get_json()
    assert info["width_l0"] == 3072 and info["height_l0"] == 2048 and info["mpp"] == pytest.approx(0.5)
    assert {layer["name"] for layer in info["layers"]} >= {"probability", "tumour", "qc_flagged"}
    assert info["regions"] and info["slide_answer"]["regions"] >= 1
    dzi = client.get(f"/run/{run}/slide.dzi")
    assert dzi.status_code == 200 and b'Width="3072"' in dzi.data and b'Height="2048"' in dzi.data
    top = 12  # ceil(log2(3072)): the full-resolution level
    tile = client.get(f"/run/{run}/slide_files/{top}/3_2.jpeg")
    assert tile.status_code == 200 and tile.mimetype == "image/jpeg"
    assert Image.open(io.BytesIO(tile.data)).size == (256, 256)  # 254 + the overlap on both sides
    for outside in (f"{top}/13_0", f"{top}/0_9", f"{top + 1}/0_0", "-1/0_0"):
        assert client.get(f"/run/{run}/slide_files/{outside}.jpeg").status_code == 404, outside
    layer = client.get(f"/run/{run}/layers/tumour.png")
    image = np.asarray(Image.open(io.BytesIO(layer.data)))
    assert layer.status_code == 200 and image.shape[2] == 4 and (image[..., 3] == 0).any() and (image[..., 3] > 0).any()
    # A click: the tile under a level-0 point, with its Grad-CAM; glass has none.
    store_coords = json.loads((out / run / "run.json").read_text())["counts"]["tiles"]
    assert store_coords > 0
    from wsi_dala.tiling.store import TileStore

    x, y = TileStore(out / run / "tiles.zarr").coords()[0]
    clicked = client.get(f"/run/{run}/tile.json?x={x + 5}&y={y + 5}").get_json()
    assert clicked["x"] == x and clicked["y"] == y and 0 <= clicked["tumour_probability"] <= 1
    assert clicked["cam_png"].startswith("data:image/png;base64,")
    assert client.get(f"/run/{run}/tile.json?x=-500&y=-500").status_code == 404
    assert client.get(f"/run/{run}/tile.json?x=nan&y=1").status_code == 400
    # Nothing else: traversal, another run, other layers, the label and macro images, any write.
    for path in (
        f"/run/{run}/../../../etc/passwd",
        f"/run/{run}/%2e%2e/%2e%2e/run.json",
        f"/run/{run}/layers/..%2f..%2frun.png",
        f"/run/{run}/layers/secret.png",
        f"/run/{run}/associated/label.jpeg",
        f"/run/{run}/associated/macro.jpeg",
        "/run/elsewhere/info.json",
        f"/run/{run}/tiles.zarr/.zattrs",
        "/static/../run.json",
    ):
        assert client.get(path).status_code == 404, path
    assert client.post(f"/run/{run}/info.json").status_code == 405
    response = client.get(f"/run/{run}/")
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_a_missing_or_changed_slide_is_named_and_a_token_guards_other_addresses(batch, tmp_path):
    out, slides = batch
    copy = tmp_path / "run"
    run = _run_id(out, "v1")
    shutil.copytree(out / run, copy)
    record = json.loads((copy / "run.json").read_text())
    moved = tmp_path / "v1.svs"
    shutil.copy2(slides["v1"].path, moved)  # the same file: size, time and bytes
    record["slide"]["path"] = str(moved)
    (copy / "run.json").write_text(json.dumps(record))
    client = _client(copy)
    assert client.get(f"/run/{copy.name}/slide.dzi").status_code == 200
    moved.write_bytes(moved.read_bytes()[:1000] + b"x" + moved.read_bytes()[1001:])  # a changed file
    changed = _client(copy).get(f"/run/{copy.name}/slide.dzi")
    assert changed.status_code == 404 and b"not the file" in changed.data
    moved.unlink()
    missing = _client(copy).get(f"/run/{copy.name}/slide.dzi")
    assert missing.status_code == 404 and b"not there any more" in missing.data
    # The token: refused without it, taken once from the address, then carried by a cookie.
    guarded = _client(out, token="s3cret")
    assert guarded.get("/").status_code == 403
    assert guarded.get("/?token=wrong").status_code == 403
    assert guarded.get("/?token=s3cret").status_code == 302
    assert guarded.get("/").status_code == 200


def test_view_through_the_console_script(batch, tmp_path):
    out, _ = batch
    process = subprocess.Popen(
        [sys.executable, "-m", "wsi_dala", "view", str(out), "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert line.startswith("viewer: http://127.0.0.1:"), line
        address = line.split()[1]
        with urllib.request.urlopen(address, timeout=30) as response:
            assert response.status == 200 and b"v0" in response.read()
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) in (0, 130)
    process = subprocess.Popen(
        [sys.executable, "-m", "wsi_dala", "view", str(out), "--port", "0", "--host", "0.0.0.0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline() if process.stdout else ""
        assert "?token=" in line, line
        bare = line.split()[1].split("?")[0].replace("0.0.0.0", "127.0.0.1")
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(bare, timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = wsi_dala("view", empty)
    assert result.returncode == 2 and "holds no finished wsi-dala run" in result.stderr


def test_the_batch_report_page_lists_sorts_and_links_to_the_viewer(batch):
    out, _ = batch
    page = (out / "report.html").read_text(encoding="utf-8")
    for stem in ("v0", "v1"):
        run = _run_id(out, stem)
        assert f"http://127.0.0.1:8765/run/{run}/" in page
        assert (out / run / "report-thumbnail.png").is_file() and f"{run}/report-thumbnail.png" in page
    assert "wsi-dala view" in page and "<script>" in page  # sorting works from disk, no server needed


@pytest.mark.slow
@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver")
def test_the_page_in_headless_chromium_paints_tumour_hot_and_glass_clear(batch, tmp_path):
    import threading

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import Select
    from werkzeug.serving import make_server

    from wsi_dala.viewer.app import create_app

    out, slides = batch
    run = _run_id(out, "v0")
    server = make_server("127.0.0.1", 0, create_app(out), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1100,800"):
        options.add_argument(argument)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/run/{run}/")

        def settled() -> None:
            for _ in range(400):
                if driver.execute_script(
                    "return !!(window.wsiDala && window.wsiDala.ready && "
                    "window.wsiDala.viewer.world.getItemAt(0).getFullyLoaded())"
                ):
                    time.sleep(0.3)
                    return
                time.sleep(0.05)
            raise AssertionError("the viewer did not finish painting")

        def screen(x_l0: float, y_l0: float) -> tuple[int, int]:
            point = driver.execute_script(
                "const s = window.wsiDala.viewer.world.getItemAt(0);"
                "const p = s.imageToViewerElementCoordinates(new OpenSeadragon.Point(arguments[0], arguments[1]));"
                "const r = document.getElementById('view').getBoundingClientRect();"
                "return [p.x + r.left, p.y + r.top];",
                x_l0,
                y_l0,
            )
            return round(point[0]), round(point[1])

        def shot() -> np.ndarray:
            return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(int)

        settled()
        truth = slides["v0"]
        tumour = truth.labels == TUMOUR
        inner = ndimage.binary_erosion(tumour, iterations=3)
        row, col = np.argwhere(inner)[len(np.argwhere(inner)) // 2]
        hot = screen((col + 0.5) * truth.label_px, (row + 0.5) * truth.label_px)
        glass = np.argwhere(ndimage.binary_erosion(truth.labels == 0, iterations=4))[0]
        clear = screen((glass[1] + 0.5) * truth.label_px, (glass[0] + 0.5) * truth.label_px)
        shown = shot()
        driver.save_screenshot(str(tmp_path / "viewer.png"))
        driver.execute_script(
            "const o = document.getElementById('opacity'); o.value = 0; o.dispatchEvent(new Event('input'));"
        )
        time.sleep(0.5)
        bare = shot()
        red, green, blue = shown[hot[1], hot[0]]
        assert red > 200 and green > 150 and blue < red - 40, (
            shown[hot[1], hot[0]],
            bare[hot[1], hot[0]],
        )  # inferno's yellow
        assert np.abs(shown[hot[1], hot[0]] - bare[hot[1], hot[0]]).sum() > 60  # the layer, not the slide
        assert np.abs(shown[clear[1], clear[0]] - bare[clear[1], clear[0]]).sum() < 12  # glass stays clear
        # Another layer (at a visible opacity: a transparent layer is never drawn): the colour bar says which.
        driver.execute_script(
            "const o = document.getElementById('opacity'); o.value = 0.7; o.dispatchEvent(new Event('input'));"
        )
        Select(driver.find_element("id", "layer")).select_by_value("qc_flagged")
        settled()
        assert driver.find_element("id", "bar-label").text == "share of QC-flagged tiles"
        # A click on tumour shows that tile's measurements and its Grad-CAM.
        from selenium.webdriver.common.action_chains import ActionChains

        view = driver.find_element("id", "view")
        rect = driver.execute_script("return document.getElementById('view').getBoundingClientRect().toJSON();")
        ActionChains(driver).move_to_element_with_offset(
            view, hot[0] - rect["left"] - rect["width"] / 2, hot[1] - rect["top"] - rect["height"] / 2
        ).click().perform()
        for _ in range(100):
            if driver.find_element("id", "tile").is_displayed():
                break
            time.sleep(0.05)
        panel = driver.find_element("id", "tile")
        assert "tumour probability" in panel.text and "QC blur" in panel.text and panel.find_elements("tag name", "img")
        assert (
            "µm" in driver.find_element("id", "scalebar-text").text
            or "mm" in driver.find_element("id", "scalebar-text").text
        )
    finally:
        driver.quit()
        server.shutdown()
