"""GET /, the page a person uses: served by the app, and driven in a real headless Chromium against a live server.

The browser tests use Debian's Chromium through Playwright (``executable_path``; nothing is downloaded) and skip
only when no Chromium binary is on the machine (``scripts/test.sh`` installs it when it can). Screenshots go to
``artifacts/web/``; ``docs/figures/web/page.png`` in the README is a copy of ``upload-astronaut.png``.
"""

from __future__ import annotations

import base64
import re
import shutil
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from skimage import data

from tests.browser_helpers import CHROMIUM_ARGS, LiveServer, fake_camera_args, find_chromium, letterbox, write_y4m
from tests.conftest import CPU, make_client
from tests.test_ensemble import relabel

REPO = Path(__file__).resolve().parents[1]
BUNDLED_MODELS = REPO / "models"
ARTIFACTS = REPO / "artifacts" / "web"
DESKTOP = {"width": 1200, "height": 820}
PHONE = {"width": 375, "height": 740}
TIMEOUT_MS = 30_000


# --- the page and its files, without a browser -----------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_client():
    with make_client(BUNDLED_MODELS) as client:
        yield client


def test_page_and_its_files_are_served_and_load_nothing_from_elsewhere(bundled_client):
    client = bundled_client
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert '<meta name="viewport"' in html and 'aria-live="polite"' in html
    for hook in ("model-select", "file-input", "drop-zone", "camera-button", "overlay", "status", "error"):
        assert f'data-testid="{hook}"' in html, hook

    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assets = [ref for ref in refs if ref.startswith("static/")]
    assert sorted(assets) == ["static/app.css", "static/app.js"]
    bodies = {"/": html}
    for ref in assets:
        response = client.get("/" + ref)
        assert response.status_code == 200, ref
        assert response.headers["content-type"].startswith("text/css" if ref.endswith(".css") else "text/javascript")
        bodies[ref] = response.text
    for name, body in bodies.items():
        assert not re.search(r"https?://", body), f"{name} names an external resource"
        assert "@import" not in body and "url(" not in body, name
    assert all(not ref.startswith(("//", "http")) for ref in refs)

    missing = client.get("/static/../main.py")
    assert missing.status_code == 404
    unknown = client.get("/static/secret.txt")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"

    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    assert "/predict" in paths and "/models" in paths
    assert client.get("/health").json() == {"status": "ok"}


# --- a real browser ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "no Chromium binary on this machine (looked for MIEN_CHROMIUM, chromium, chromium-browser, google-chrome); "
            "`apt-get install chromium` (scripts/test.sh does it when run as root)"
        )
    return path


@pytest.fixture(scope="module")
def astronaut_rgb() -> np.ndarray:
    return data.astronaut()


@pytest.fixture(scope="module")
def camera_video(tmp_path_factory, astronaut_rgb) -> Path:
    """The astronaut in a webcam-sized 640×480 frame, as the .y4m Chromium's fake camera plays."""
    return write_y4m(tmp_path_factory.mktemp("camera") / "astronaut.y4m", letterbox(astronaut_rgb, 640, 480))


@pytest.fixture(scope="module")
def browser(chromium_path, camera_video):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS + fake_camera_args(camera_video)
        )
        yield launched
        launched.close()


def serve(model_dir: Path) -> LiveServer:
    from mien.service.config import Settings
    from mien.service.main import create_app

    return LiveServer(create_app(Settings(model_dir=model_dir, providers=CPU, threads=1)))


@pytest.fixture(scope="module")
def bundled_server(chromium_path):
    """The repository's own trained models (mini_xception by default): their answers are real expressions."""
    assert (BUNDLED_MODELS / "mini_xception.onnx").is_file()
    with serve(BUNDLED_MODELS) as server:
        # One request first, so the latency the page shows (and the README's screenshot) is a warm server's.
        httpx.post(
            server.url + "/predict", files={"file": ("a.jpg", jpeg(data.astronaut()), "image/jpeg")}, timeout=120
        )
        yield server.url


@pytest.fixture(scope="module")
def twin_server(chromium_path, tmp_path_factory):
    """The bundled mini_xception and a copy of it served as `twin`: which one answered is observable.

    (Copies of the bundled model rather than the conftest's trained one: no training run for these tests.)
    """
    folder = tmp_path_factory.mktemp("web_models")
    shutil.copy(BUNDLED_MODELS / "mini_xception.onnx", folder / "mini_xception.onnx")
    relabel(BUNDLED_MODELS / "mini_xception.onnx", folder / "twin.onnx", "twin")
    with serve(folder) as server:
        yield server.url


@pytest.fixture
def open_page(browser):
    """open_page(url, viewport=...) -> a Playwright page with the model list loaded; its console is checked."""
    contexts, problems = [], []

    def _open(url: str, viewport: dict = DESKTOP, **options):
        context = browser.new_context(viewport=viewport, **options)
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
        page.goto(url + "/")
        page.wait_for_selector("[data-testid=model-select]:not([disabled])")
        return page

    yield _open
    for context in contexts:
        context.close()
    # A refused request shows up as "Failed to load resource" (the error test makes one on purpose);
    # anything else (a script error, a Content-Security-Policy violation) is a bug of the page.
    assert [p for p in problems if "Failed to load resource" not in p] == []


def jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()


def upload(page, name: str, content: bytes, mime: str = "image/jpeg") -> None:
    page.set_input_files("[data-testid=file-input]", files=[{"name": name, "mimeType": mime, "buffer": content}])


def wait_for_answer(page, model: str | None = None) -> None:
    """Until the page shows an answer (from ``model`` when given)."""
    answer = page.locator("[data-testid=answer-model]")
    answer.wait_for(state="visible")
    if model is not None:
        page.wait_for_function("m => document.getElementById('answer-model').textContent === m", arg=model)


def painted_pixels(page) -> int:
    """How many pixels of the overlay canvas are not transparent: the drawn boxes and labels."""
    return page.evaluate(
        """() => {
            const c = document.getElementById('overlay');
            const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++;
            return n;
        }"""
    )


def bars(page) -> dict[str, float]:
    items = page.locator("[data-testid=face-card]").first.locator("[data-testid=bar]")
    return {items.nth(i).get_attribute("data-label"): float(items.nth(i).get_attribute("data-value"))
            for i in range(items.count())}  # fmt: skip


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_upload_the_astronaut_shows_happy_a_box_and_every_probability(open_page, bundled_server, astronaut_rgb):
    models = httpx.get(bundled_server + "/models").json()
    labels = next(m["labels"] for m in models["models"] if m["id"] == models["default"])
    page = open_page(bundled_server)
    assert page.locator("[data-testid=model-select]").input_value() == models["default"]

    upload(page, "astronaut.jpg", jpeg(astronaut_rgb))
    wait_for_answer(page, models["default"])
    page.wait_for_selector("[data-testid=face-card]")
    assert page.locator("[data-testid=face-card]").count() == 1
    assert page.locator("[data-testid=top-label]").inner_text() == "happy"
    assert page.locator("[data-testid=overlay]").get_attribute("data-boxes") == "1"
    page.wait_for_function("() => document.getElementById('photo').complete")
    assert painted_pixels(page) > 500  # the box and its label are on the canvas
    probabilities = bars(page)
    assert list(probabilities) == labels
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert max(probabilities, key=probabilities.get) == "happy"
    assert page.locator("[data-testid=answer-provider]").inner_text() == "CPUExecutionProvider"
    assert re.fullmatch(
        r"\d+ ms on the server, \d+ ms round trip", page.locator("[data-testid=answer-latency]").inner_text()
    )
    assert page.locator("[data-testid=status]").inner_text() == "1 face: happy."
    assert page.locator("[data-testid=error]").is_hidden()
    assert page.locator("[data-testid=photo]").get_attribute("alt") == "the uploaded photo astronaut.jpg"
    screenshot(page, "upload-astronaut.png")


def test_a_photo_dropped_on_the_page_is_sent(open_page, bundled_server, astronaut_rgb):
    page = open_page(bundled_server)
    page.evaluate(
        """([b64, name]) => {
            const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
            const dt = new DataTransfer();
            dt.items.add(new File([bytes], name, {type: 'image/jpeg'}));
            const zone = document.getElementById('drop-zone');
            for (const type of ['dragenter', 'dragover', 'drop'])
                zone.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }""",
        [base64.b64encode(jpeg(astronaut_rgb)).decode("ascii"), "dropped.jpg"],
    )
    page.wait_for_selector("[data-testid=face-card]")
    assert page.locator("[data-testid=top-label]").inner_text() == "happy"
    assert page.locator("[data-testid=overlay]").get_attribute("data-boxes") == "1"


def test_switching_the_model_resends_the_photo_to_the_chosen_model(open_page, twin_server, astronaut_rgb):
    page = open_page(twin_server)
    select = page.locator("[data-testid=model-select]")
    assert select.input_value() == "mini_xception"
    assert sorted(select.locator("option").all_inner_texts()) == ["mini_xception", "twin"]

    upload(page, "astronaut.jpg", jpeg(astronaut_rgb))
    wait_for_answer(page, "mini_xception")
    page.wait_for_selector("[data-testid=face-card]")
    requests_before = page.evaluate("() => window.mien.stats.requests")
    select.select_option("twin")
    wait_for_answer(page, "twin")  # the model id in the server's answer, not the picker's own value
    assert page.evaluate("() => window.mien.stats.requests") == requests_before + 1
    assert page.locator("[data-testid=overlay]").get_attribute("data-boxes") == "1"
    screenshot(page, "switch-model.png")

    select.select_option("mini_xception")
    wait_for_answer(page, "mini_xception")

    # A picture without a face: the page says so, draws nothing and lists no face.
    upload(page, "wall.png", cv2.imencode(".png", np.full((240, 320, 3), 128, np.uint8))[1].tobytes(), "image/png")
    page.wait_for_function("() => document.getElementById('status').textContent === 'No face found in this picture.'")
    assert page.locator("[data-testid=face-card]").count() == 0
    assert page.locator("[data-testid=overlay]").get_attribute("data-boxes") == "0"
    assert page.locator("[data-testid=error]").is_hidden()
    screenshot(page, "no-face.png")


def test_a_server_error_shows_its_message(open_page, twin_server, astronaut_rgb):
    content, name, mime = b"these are notes, not a photo\n", "notes.txt", "text/plain"
    expected = httpx.post(twin_server + "/predict", files={"file": (name, content, mime)})
    assert expected.status_code == 415
    message = expected.json()["error"]["message"]

    page = open_page(twin_server)
    upload(page, name, content, mime)
    error = page.locator("[data-testid=error]")
    error.wait_for(state="visible")
    assert error.inner_text() == message
    assert error.get_attribute("role") == "alert"
    assert page.locator("[data-testid=face-card]").count() == 0
    screenshot(page, "error.png")

    # The next good photo clears the error.
    upload(page, "astronaut.jpg", jpeg(astronaut_rgb))
    page.wait_for_selector("[data-testid=face-card]")
    assert error.is_hidden()


def test_a_service_with_an_api_key_asks_for_it_and_then_answers(open_page, chromium_path, astronaut_rgb):
    from mien.service.config import Settings
    from mien.service.main import create_app

    key = "page-test-key-0123456789"
    settings = Settings(model_dir=BUNDLED_MODELS, providers=CPU, threads=1, api_key=key)
    with LiveServer(create_app(settings)) as server:
        page = open_page(server.url)  # the model list is open: no key needed for it
        assert page.locator("[data-testid=key-field]").is_hidden()
        upload(page, "astronaut.jpg", jpeg(astronaut_rgb))
        error = page.locator("[data-testid=error]")
        error.wait_for(state="visible")
        assert "API key" in error.inner_text()
        page.locator("[data-testid=key-field]").wait_for(state="visible")
        page.fill("[data-testid=api-key]", key)
        page.dispatch_event("[data-testid=api-key]", "change")  # re-sends the photo with the key
        page.wait_for_selector("[data-testid=face-card]")
        assert error.is_hidden()


def test_a_face_below_min_confidence_shows_not_sure_with_its_probabilities(open_page, chromium_path, astronaut_rgb):
    from mien.service.config import Settings
    from mien.service.main import create_app

    settings = Settings(model_dir=BUNDLED_MODELS, providers=CPU, threads=1, min_confidence=1.0)  # nothing reaches 1
    with LiveServer(create_app(settings)) as server:
        page = open_page(server.url)
        upload(page, "astronaut.jpg", jpeg(astronaut_rgb))
        page.wait_for_selector("[data-testid=face-card]")
        assert page.locator("[data-testid=top-label]").inner_text() == "not sure"
        assert page.locator("[data-testid=status]").inner_text() == "1 face: not sure."
        probabilities = bars(page)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)  # still every probability
        assert max(probabilities, key=probabilities.get) == "happy"


def test_the_camera_sends_frames_one_at_a_time_and_draws_boxes(open_page, bundled_server):
    page = open_page(bundled_server)
    button = page.locator("[data-testid=camera-button]")
    button.click()
    # Chromium's fake camera plays the astronaut video; the real server finds her face in the frames.
    page.wait_for_function("() => Number(document.getElementById('overlay').dataset.boxes) >= 1", timeout=90_000)
    assert button.get_attribute("aria-pressed") == "true"
    assert page.locator("[data-testid=video]").is_visible()
    assert page.evaluate(
        "() => [document.getElementById('video').videoWidth, document.getElementById('video').videoHeight]"
    ) == [640, 480]
    assert page.locator("[data-testid=face-card]").count() >= 1
    assert painted_pixels(page) > 500
    assert page.locator("[data-testid=answer-model]").inner_text() == "mini_xception"
    screenshot(page, "camera.png")

    # From here the test plays the server, to see what the page sends whatever the real server's speed.
    canned = page.evaluate("() => window.mien.lastAnswer")
    held, seen, mode = [], [], {"hold": True}

    def on_predict(route) -> None:
        seen.append(time.monotonic())
        if mode["hold"]:
            held.append(route)  # a server that has not answered yet
        else:
            route.fulfill(status=200, json=canned)

    page.route(re.compile(r"/predict\?"), on_predict)
    try:
        deadline = time.monotonic() + 60
        while not held and time.monotonic() < deadline:
            page.wait_for_timeout(100)
        assert len(held) == 1
        page.wait_for_timeout(1500)
        assert len(held) == 1, "a frame was sent while the previous one had no answer"
        assert page.evaluate("() => window.mien.state.inFlight") == 1

        # A server that answers at once: the frames come at most 4 a second, and keep coming.
        mode["hold"] = False
        first = len(seen)
        held.pop().fulfill(status=200, json=canned)
        start = time.monotonic()
        page.wait_for_timeout(3000)
        times = seen[first:]
        elapsed = time.monotonic() - start
        assert 3 <= len(times) <= 4 * elapsed + 1, (len(times), elapsed)
        # The page's own send times (the test's are late by however long Playwright took to call it).
        gaps = np.diff(page.evaluate("() => window.mien.stats.frameTimes")[-len(times) :])
        assert gaps.min() >= 0.99 * 250, gaps
        assert page.evaluate("() => window.mien.stats.maxInFlight") == 1
    finally:  # never leave the page waiting on an answer that will not come (closing would hang)
        for route in held:
            route.abort()
        page.unroute_all(behavior="ignoreErrors")

    button.click()
    assert button.get_attribute("aria-pressed") == "false"
    page.wait_for_function("() => document.getElementById('stage').dataset.mode === 'empty'")
    count = page.evaluate("() => window.mien.stats.framesSent")
    page.wait_for_timeout(800)
    assert page.evaluate("() => window.mien.stats.framesSent") == count  # stopped means stopped
    assert page.locator("[data-testid=face-card]").count() == 0


def test_a_phone_sized_screen_has_no_horizontal_overflow(open_page, bundled_server, astronaut_rgb):
    page = open_page(bundled_server, viewport=PHONE, is_mobile=True, has_touch=True, device_scale_factor=2)
    upload(page, "astronaut.jpg", jpeg(astronaut_rgb))
    page.wait_for_selector("[data-testid=face-card]")
    width = page.evaluate("() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1], width
    # Every control and panel inside the page's margins (1rem = 16 px each side).
    for hook in ("model-select", "drop-zone", "camera-button", "stage", "answer", "face-card"):
        box = page.locator(f"[data-testid={hook}]").first.bounding_box()
        assert box is not None and box["x"] >= 15.5 and box["x"] + box["width"] <= PHONE["width"] - 15.5, (hook, box)
    screenshot(page, "phone.png")
