"""Take the README's screenshot of the demo with headless chromium (selenium).

    python demo/screenshot.py --model runs/main_job/pcme --caption "a red circle" --out docs/demo.png

Starts the app in this process on a free port (shapes test gallery), types the caption, waits for
the results and saves a PNG of the page. Needs /usr/bin/chromium and /usr/bin/chromedriver.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from app import build_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/main_job/pcme")
    parser.add_argument("--caption", default="a red circle")
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--size", default="1400,1150", help="browser window width,height")
    args = parser.parse_args()

    demo = build_demo(args.model, "shapes")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--window-size={args.size}", "--hide-scrollbars"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path="/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            field = WebDriverWait(driver, 60).until(lambda d: d.find_element(By.CSS_SELECTOR, "#caption-query textarea, #caption-query input"))
            field.send_keys(args.caption)
            driver.find_element(By.ID, "caption-submit").click()
            WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .pcme-result"))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.out)
            print(f"saved {args.out}")
        finally:
            driver.quit()
            demo.close()


if __name__ == "__main__":
    main()
