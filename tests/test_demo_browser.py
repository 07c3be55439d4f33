"""The Gradio demo (demo/app.py) driven through a real headless chromium with selenium.

The app is served on 127.0.0.1 (a free port, gradio's own server thread) with a tiny model built
here and a gallery of 12 images with captions. The expected rankings come from the same backend
called directly in Python (no browser), and the ordering and the uncertainty values are checked
against the model's embeddings computed here.
Skipped where /usr/bin/chromium or /usr/bin/chromedriver is missing (CI installs both).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO_ROOT = Path(__file__).resolve().parent.parent
TOP_K = 5
CAPTIONS = [
    f"a {size} {colour} {shape}"
    for size, colour, shape in itertools.product(("small", "large"), ("red", "green", "blue"), ("circle", "square"))
]
WAIT_S = 30

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver",
        allow_module_level=True,
    )
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no telemetry calls
pytest.importorskip("gradio")
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def load_demo_app():
    spec = importlib.util.spec_from_file_location("pcme_demo_app", REPO_ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def gallery_images(count: int = 12, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from hf_pcme import PCMEModel
    from hf_pcme.testing import tiny_pcme_config, tiny_processor

    module = load_demo_app()
    torch.manual_seed(0)
    model = PCMEModel(tiny_pcme_config(match_function="csd", loss_type="pcme++")).eval()
    processor = tiny_processor(CAPTIONS)
    plot = tmp_path_factory.mktemp("model") / "uncertainty_vs_vagueness.png"
    Image.new("RGB", (120, 90), (200, 30, 30)).save(plot)
    analysis = sys.modules["demo_backend"].UncertaintyAnalysis(spearman_rho=-0.5, source=str(plot.parent / "results.json"))
    backend = module.DemoBackend((model, processor), gallery_images(), gallery_captions=CAPTIONS, progress_bar=False,
                                 analysis=analysis, plots=[plot])
    demo = module.build_demo(backend=backend, top_k=TOP_K)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "backend": backend, "model": model, "processor": processor}
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(served, browser):
    browser.get(served["url"])
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#caption-query textarea, #caption-query input"))
    return browser


def rendered_results(driver) -> list:
    """The result elements, once the answer arrived (query info and results come in one update)."""
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#query-info .pcme-query, #query-info .pcme-error")
    )
    return driver.find_elements(By.CSS_SELECTOR, "#results .pcme-result")


def upload(driver, element_id: str, path: Path) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{element_id} input[type=file]").send_keys(str(path))
    # uploaded once the component offers the server's copy for download
    WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, f'#{element_id} a[download="{path.name}"]')
    )


def check_rendered(results: list, expected) -> None:
    """Count, order (by score, best first) and the uncertainty shown for each item."""
    assert len(results) == TOP_K == len(expected.results)
    scores = [float(r.get_attribute("data-score")) for r in results]
    assert scores == sorted(scores, reverse=True)
    assert [r.get_attribute("data-rank") for r in results] == [str(i) for i in range(1, TOP_K + 1)]
    for element, item in zip(results, expected.results):
        assert float(element.get_attribute("data-score")) == pytest.approx(item.score, rel=1e-4, abs=1e-6)
        assert float(element.get_attribute("data-uncertainty")) == pytest.approx(item.uncertainty, rel=1e-4)
        assert element.find_elements(By.CSS_SELECTOR, ".pcme-ubar > span")  # the bar is drawn
        assert "σ²" in element.text


def test_caption_query_renders_ranked_images(page, served, tmp_path):
    caption = CAPTIONS[3]
    field = page.find_element(By.CSS_SELECTOR, "#caption-query textarea, #caption-query input")
    field.send_keys(caption)
    page.find_element(By.ID, "caption-submit").click()
    results = rendered_results(page)
    page.save_screenshot(str(tmp_path / "caption_query.png"))

    expected = served["backend"].query_text(caption, TOP_K)
    check_rendered(results, expected)
    assert all(r.find_elements(By.TAG_NAME, "img") for r in results)
    # the scores are CSD (-distance): recompute the image ranking from the embeddings here
    model, processor = served["model"], served["processor"]
    with torch.no_grad():
        text = model.get_text_features(**processor(text=[caption]), num_samples=0)
        images = model.get_image_features(processor(images=gallery_images())["pixel_values"], num_samples=0)
    distance = ((text.mean[0] - images.mean) ** 2).sum(-1) + text.log_sigma2[0].exp().sum() + images.log_sigma2.exp().sum(-1)
    assert [item.id for item in expected.results] == distance.argsort()[:TOP_K].tolist()
    info = page.find_element(By.ID, "query-info").text
    assert "σ²" in info and "Attention over the caption" in info


def test_image_query_renders_ranked_captions(page, served, tmp_path):
    query = tmp_path / "query.png"
    gallery_images()[4].save(query)
    upload(page, "image-query", query)
    page.find_element(By.ID, "image-submit").click()
    results = rendered_results(page)
    page.save_screenshot(str(tmp_path / "image_query.png"))

    expected = served["backend"].query_image(query, TOP_K)
    check_rendered(results, expected)
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in results] == [item.text for item in expected.results]
    assert page.find_element(By.CSS_SELECTOR, "#attention-heatmap img").get_attribute("src")


def test_text_file_upload_shows_an_error(page, tmp_path):
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("this is not an image\n")
    upload(page, "image-query", not_an_image)
    page.find_element(By.ID, "image-submit").click()
    error = WebDriverWait(page, WAIT_S).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query-info .pcme-error"))
    page.save_screenshot(str(tmp_path / "bad_upload.png"))
    assert "notes.txt" in error[0].text and "not an image" in error[0].text
    assert not page.find_elements(By.CSS_SELECTOR, "#results .pcme-result")


def test_gallery_swap_at_runtime(page, served, tmp_path):
    paths = []
    for i, image in enumerate(gallery_images(3)):
        paths.append(tmp_path / f"new{i}.png")
        image.save(paths[-1])
    page.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Gallery')]").click()
    page.find_element(By.CSS_SELECTOR, "#gallery-upload input[type=file]").send_keys("\n".join(map(str, paths)))
    WebDriverWait(page, WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery-upload a[download]")) == len(paths)
    )
    page.find_element(By.ID, "gallery-swap").click()
    WebDriverWait(page, WAIT_S).until(lambda d: "3 uploaded images" in d.find_element(By.ID, "gallery-status").text)
    page.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Search')]").click()
    field = page.find_element(By.CSS_SELECTOR, "#caption-query textarea, #caption-query input")
    field.send_keys(CAPTIONS[0])
    page.find_element(By.ID, "caption-submit").click()
    results = rendered_results(page)
    assert len(results) == 3  # the new gallery (top 5 capped at its 3 images)
    assert "3 uploaded images" in page.find_element(By.ID, "results").text
    assert len(served["backend"].gallery) == 12  # the swap is this session's; the start-up gallery stays


def test_model_analysis_tab_shows_the_saved_plot(page):
    page.find_element(By.XPATH, "//button[@role='tab'][contains(., 'Model analysis')]").click()
    images = WebDriverWait(page, WAIT_S).until(
        lambda d: [img for img in d.find_elements(By.CSS_SELECTOR, "img") if "uncertainty_vs_vagueness" in (img.get_attribute("src") or "")]
    )
    assert page.execute_script("return arguments[0].naturalWidth", images[0]) == 120  # the file was served
    assert "-0.500" in page.find_element(By.TAG_NAME, "body").text
