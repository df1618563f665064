"""Issue 6: the web API (in-process), a real server under concurrent load, and a real browser."""
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cifarkit.cli import main

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(trained_run):
    from fastapi.testclient import TestClient
    from cifarkit.serve import create_app, load_predictor
    return TestClient(create_app(load_predictor(str(trained_run[1] / "best.ckpt")), top_k=3, max_bytes=200_000))


def _png(data_dir, cls="ship") -> bytes:
    return next((data_dir / "train" / cls).iterdir()).read_bytes()


def test_health_model_page(client):
    assert client.get("/health").json() == {"status": "ok"}
    card = client.get("/model").json()
    assert card["model"] == "tudui_relu" and card["classes"] == ["cat", "dog", "ship"]
    assert card["val_accuracy"] is not None and card["recipe"] == "tutorial"
    page = client.get("/")
    assert page.status_code == 200 and "Model card" in page.text and "http" not in page.text.split("<script>")[1]


def test_predict_matches_cli_json(client, trained_run, capsys):
    data, out = trained_run
    f = next((data / "train" / "ship").iterdir())
    r = client.post("/predict", files={"file": (f.name, f.read_bytes(), "image/png")})
    assert r.status_code == 200
    main(["predict", str(out / "best.ckpt"), str(f), "--json"])
    cli = json.loads(capsys.readouterr().out)
    assert r.json()[0]["top"] == cli[0]["top"] and r.json()[0]["path"] == f.name


def test_bad_uploads_get_4xx_and_server_keeps_serving(client, trained_run):
    r = client.post("/predict", files={"file": ("x.jpg", b"<html>nope</html>", "image/jpeg")})
    assert r.status_code == 400 and "x.jpg" in r.json()["detail"]
    r = client.post("/predict", files={"file": ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png")})
    assert r.status_code == 413
    r = client.post("/predict", files={"file": ("empty.png", b"", "image/png")})
    assert r.status_code == 400
    assert client.post("/predict").status_code == 422
    ok = client.post("/predict", files={"file": ("a.png", _png(trained_run[0]), "image/png")})
    assert ok.status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_run):
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cifarkit", "serve", str(trained_run[1] / "best.ckpt"),
                             "--port", str(port)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not start: " + proc.stderr.read().decode()[-500:])
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def test_concurrent_load_all_answered(server, trained_run):
    """200 requests from 8 clients against the real server on loopback; p95 latency reported."""
    body = _png(trained_run[0])
    latencies = []

    def one(_):
        with httpx.Client(timeout=30) as c:
            t = time.perf_counter()
            r = c.post(server + "/predict", files={"file": ("a.png", body, "image/png")})
            latencies.append(time.perf_counter() - t)
            return r.status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200
    p95 = statistics.quantiles(latencies, n=20)[18]
    print(f"\nserve: 200 requests, 8 clients, p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p95 {p95 * 1000:.1f} ms")
    assert p95 < 5.0


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser(p, sync_api):
    exe = _chromium()
    if not exe:
        pytest.skip("no chromium here (CI installs Debian's chromium)")
    return p.chromium.launch(executable_path=exe, args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])


def test_browser_upload_shows_prediction(server, trained_run, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    img = tmp_path / "ship.png"
    img.write_bytes(_png(trained_run[0], "ship"))
    with sync_api.sync_playwright() as p:
        browser = _browser(p, sync_api)
        try:
            page = browser.new_page()
            page.goto(server + "/")
            page.wait_for_selector("#card dt")
            assert "tudui_relu" in page.inner_text("#card")
            page.set_input_files("#files", str(img))
            page.wait_for_selector(".result[data-top]", timeout=20_000)
            top = page.get_attribute(".result[data-top]", "data-top")
            assert top == "ship"
            assert "%" in page.inner_text(".result .bars")
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()


def _overlap(a: dict, b: dict) -> bool:
    return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
            and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])


def test_browser_layout_two_photos_in_order_without_overlap(server, trained_run, tmp_path):
    """At 1200x800, after picking a large photo and a small one: the drop zone, the results and
    the model card do not overlap, and the results list in the order picked."""
    sync_api = pytest.importorskip("playwright.sync_api")
    from PIL import Image
    big, small = tmp_path / "b_big_photo.jpg", tmp_path / "a_small.png"
    ship = Image.open(next((trained_run[0] / "train" / "ship").iterdir())).convert("RGB")
    ship.resize((2000, 1500), Image.BICUBIC).save(big, quality=85)
    small.write_bytes(_png(trained_run[0], "cat"))
    with sync_api.sync_playwright() as p:
        browser = _browser(p, sync_api)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.goto(server + "/")
            page.wait_for_selector("#card dt")
            page.set_input_files("#files", [str(big), str(small)])   # picked: big first
            page.wait_for_function("document.querySelectorAll('.result[data-top]').length == 2",
                                   timeout=30_000)
            rows = page.query_selector_all(".result")
            assert [r.get_attribute("data-name") for r in rows] == [big.name, small.name]
            drop = page.query_selector("#drop").bounding_box()
            card = page.query_selector("aside").bounding_box()
            boxes = [r.bounding_box() for r in rows]
            assert drop["height"] > 40
            for i, b in enumerate(boxes):
                assert not _overlap(drop, b), ("drop zone overlaps result", i, drop, b)
                assert not _overlap(card, b), ("model card overlaps result", i, card, b)
                assert b["y"] >= drop["y"] + drop["height"]
            assert not _overlap(boxes[0], boxes[1]) and boxes[0]["y"] < boxes[1]["y"]
            assert not _overlap(drop, card)
            page.screenshot(path=str(tmp_path / "layout.png"))
        finally:
            browser.close()
