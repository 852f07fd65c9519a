"""The notebooks in JupyterLab: the `bloodcell` kernel is registered, and a JupyterLab server on
a loopback port serves the notebooks through its contents API."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NOTEBOOKS = ("01_explore", "02_train", "03_evaluate", "04_report")

pytestmark = pytest.mark.slow


def test_kernelspec_list_shows_bloodcell():
    out = subprocess.run([str(BIN / "jupyter"), "kernelspec", "list"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = [line.split()[0] for line in out.stdout.splitlines()[1:] if line.strip()]
    assert "bloodcell" in names, out.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    requests = pytest.importorskip("requests")
    port, token = _free_port(), secrets.token_hex(16)
    runtime = tmp_path_factory.mktemp("jupyter-runtime")
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime))
    log = open(runtime / "lab.log", "w")
    cmd = [str(BIN / "jupyter"), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={ROOT}",
           "--ServerApp.open_browser=False"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    session = requests.Session()
    session.headers["Authorization"] = f"token {token}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{(runtime / 'lab.log').read_text()[-3000:]}")
            try:
                if session.get(f"{base}/api/status", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail("jupyter lab did not answer within 120 s:\n" + (runtime / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
        yield base, session
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def test_lab_serves_the_notebooks(lab):
    base, session = lab
    listing = session.get(f"{base}/api/contents/notebooks", timeout=30)
    assert listing.status_code == 200
    names = {item["name"] for item in listing.json()["content"]}
    for nb in NOTEBOOKS:
        assert f"{nb}.ipynb" in names
        reply = session.get(f"{base}/api/contents/notebooks/{nb}.ipynb", params={"content": 1}, timeout=30)
        assert reply.status_code == 200, reply.text
        model = reply.json()
        assert model["type"] == "notebook"
        content = model["content"]
        assert content["metadata"]["kernelspec"]["name"] == "bloodcell"
        assert "parameters" in content["cells"][0]["metadata"]["tags"]


def test_lab_knows_the_bloodcell_kernel(lab):
    base, session = lab
    specs = session.get(f"{base}/api/kernelspecs", timeout=30).json()
    assert "bloodcell" in specs["kernelspecs"]


def test_lab_refuses_requests_without_the_token(lab):
    import requests

    base, _ = lab
    assert requests.get(f"{base}/api/contents/notebooks", timeout=30).status_code in (401, 403)
