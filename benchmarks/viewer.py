"""The viewer's speed: how fast the first view of a large slide is painted in a browser, and how many Deep Zoom
tiles a second the server answers on two cores.

    python benchmarks/viewer.py                          # writes and runs a 40,000 x 30,000 slide first (minutes)
    python benchmarks/viewer.py --run RUN_DIR            # an existing run folder

First view: headless Chromium (Debian's chromium and chromium-driver) opens the run's page; the time is from
the request to the moment the slide's visible tiles and the tumour layer are all drawn, in a browser already
started (a second slide, to keep the browser's own start-up out). Tiles: two client threads fetch distinct
tiles of the three finest levels, in random order, from the threaded server, for ``--seconds``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def make_run(work: Path) -> Path:
    from wsi_dala.model import write_untrained_checkpoint
    from wsi_dala.model.colour import CLASS_NAMES
    from wsi_dala.slides.synthetic import SyntheticSlideSpec, write_synthetic_slide

    slide = work / "large.svs"
    if not slide.exists():
        write_synthetic_slide(slide, SyntheticSlideSpec(width=40000, height=30000, mpp=0.25, seed=7))
    model = work / "colour.safetensors"
    if not model.exists():
        write_untrained_checkpoint(model, "colour-reference", 64, 1.0, CLASS_NAMES)
    run = work / "run"
    if not (run / "run.json").exists():
        subprocess.run(
            [sys.executable, "-m", "wsi_dala", "run", slide, "--model", model, "--out", run, "-q"], check=True
        )
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run folder (default: make one)")
    parser.add_argument("--work", type=Path, default=Path("viewer-bench"), help="where a generated run goes")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the tile clients run")
    args = parser.parse_args()

    from tissue import cpu_flags
    from werkzeug.serving import make_server

    from wsi_dala.viewer.app import create_app
    from wsi_dala.viewer.catalogue import find_runs
    from wsi_dala.viewer.deepzoom import DeepZoomSlide

    print(f"{os.cpu_count()} cores, CPU {cpu_flags()}")
    run = args.run or make_run(args.work)
    entry = next(iter(find_runs(run).values()))
    server = make_server("127.0.0.1", 0, create_app(run), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/run/{entry.run_id}/"
    slide = DeepZoomSlide(entry.slide_path, "tiffslide")
    levels = slide.level_count
    generator = slide.generator()
    addresses = [
        f"{base}slide_files/{level}/{column}_{row}.jpeg"
        for level in range(levels - 3, levels)
        for column in range(generator.level_tiles[level][0])
        for row in range(generator.level_tiles[level][1])
    ]
    random.Random(0).shuffle(addresses)
    print(f"slide {entry.slide_path.name}: {generator.level_dimensions[-1][0]} x {generator.level_dimensions[-1][1]}")

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver_path:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900"):
            options.add_argument(argument)
        options.binary_location = chromium
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        try:
            driver.get("about:blank")
            started = time.perf_counter()
            driver.get(base)
            while not driver.execute_script(
                "return !!(window.wsiDala && window.wsiDala.ready && window.wsiDala.viewer.world.getItemAt(0)"
                ".getFullyLoaded())"
            ):
                time.sleep(0.02)
            print(f"first view painted (slide tiles and the tumour layer): {time.perf_counter() - started:.2f} s")
        finally:
            driver.quit()
    else:
        print("first view: not measured (needs Debian's chromium and chromium-driver)")

    served = 0
    lock = threading.Lock()
    stop = time.perf_counter() + args.seconds

    def client(share: list[str]) -> None:
        nonlocal served
        for address in share:
            if time.perf_counter() > stop:
                return
            with urllib.request.urlopen(address) as response:
                response.read()
            with lock:
                served += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(addresses[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    print(f"Deep Zoom tiles: {served} in {elapsed:.1f} s = {served / elapsed:.0f} tiles/s (2 client threads)")
    server.shutdown()


if __name__ == "__main__":
    main()
