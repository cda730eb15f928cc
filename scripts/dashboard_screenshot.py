"""Screenshot a page of the running Ray dashboard in headless Chromium (for docs/).

Usage (with the app running, e.g. after `make run`):

    .venv/bin/python scripts/dashboard_screenshot.py [--url http://127.0.0.1:8265/#/serve] [--out docs/x.png]

Ray's dashboard asks for the cluster's auth token (``~/.ray/auth_token``) when
token authentication is on; the script passes it as the dashboard's cookie.
Chromium is driven over the DevTools protocol (Debian's ``chromium`` package).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import websockets

ROOT = Path(__file__).resolve().parent.parent


def _token() -> str | None:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    return os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.is_file() else None)


async def _shoot(ws_url: str, url: str, out: Path, width: int, height: int, wait_s: float) -> None:
    async with websockets.connect(ws_url, max_size=64 * 2**20) as ws:
        counter = 0

        async def call(method: str, **params):
            nonlocal counter
            counter += 1
            await ws.send(json.dumps({"id": counter, "method": method, "params": params}))
            while True:
                msg = json.loads(await ws.recv())
                if msg.get("id") == counter:
                    return msg.get("result", {})

        await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        token = _token()
        if token:
            host = url.split("://", 1)[1].split("/", 1)[0].split(":")[0]
            await call("Network.setCookie", name="ray-authentication-token", value=token, domain=host, path="/")
        await call("Page.enable")
        await call("Page.navigate", url=url)
        await asyncio.sleep(wait_s)  # the dashboard is a single-page app that fills in after load
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8265/#/serve")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "ray-dashboard-serve.png")
    ap.add_argument("--width", type=int, default=1440)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--wait", type=float, default=8.0)
    args = ap.parse_args()

    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        raise SystemExit("needs Chromium: apt-get install chromium")
    port = 9333
    profile = tempfile.mkdtemp(prefix="chromium-")
    proc = subprocess.Popen(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={port}",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(50):
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
                break
            except OSError:
                time.sleep(0.2)
        else:
            raise SystemExit("Chromium did not start")
        page = next(t for t in targets if t["type"] == "page")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(_shoot(page["webSocketDebuggerUrl"], args.url, args.out, args.width, args.height, args.wait))
        print(f"wrote {args.out}")
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
