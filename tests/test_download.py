"""download.sh against a local HTTP server that plays Meta's presigned-URL host (offline)."""

import hashlib
import os
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.skipif(
    not (shutil.which("bash") and shutil.which("wget") and shutil.which("md5sum")), reason="needs bash, wget, md5sum"
)
SIGNATURE = "Signature=good"
SHARDS = {"llama-2-7b": 1, "llama-2-13b": 2, "llama-2-70b": 8, "llama-2-7b-chat": 1, "llama-2-13b-chat": 2, "llama-2-70b-chat": 8}


def make_tree(root: Path) -> dict:
    """Fake weights with Meta's layout and md5 checklists; returns {path: bytes}."""
    files = {"LICENSE": b"license text\n", "USE_POLICY.md": b"policy\n", "tokenizer.model": os.urandom(3000)}
    files["tokenizer_checklist.chk"] = f"{hashlib.md5(files['tokenizer.model']).hexdigest()}  tokenizer.model\n".encode()
    for folder, n in SHARDS.items():
        names = {f"consolidated.{i:02d}.pth": os.urandom(150_000 + i) for i in range(n)}
        names["params.json"] = b'{"dim": 64}'
        files.update({f"{folder}/{k}": v for k, v in names.items()})
        files[f"{folder}/checklist.chk"] = "".join(f"{hashlib.md5(v).hexdigest()}  {k}\n" for k, v in names.items()).encode()
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return files


class Server:
    """Serves `root` at /PATH?...Signature=good, honouring Range; 403 otherwise. Logs (path, range)."""

    def __init__(self, root: Path):
        self.root, self.requests, self.corrupt = root, [], set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                url = urlsplit(self.path)
                path = url.path.lstrip("/")
                outer.requests.append((path, self.headers.get("Range")))
                if SIGNATURE not in url.query:
                    return self.send_error(403, "Forbidden")
                file = outer.root / path
                if not file.is_file():
                    return self.send_error(404, "Not Found")
                data = file.read_bytes()
                if path in outer.corrupt:
                    data = bytes([data[0] ^ 1]) + data[1:]
                start = 0
                m = re.match(r"bytes=(\d+)-$", self.headers.get("Range") or "")
                if m:
                    start = int(m.group(1))
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                self.wfile.write(data[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/*?Policy=abc&{SIGNATURE}&Key-Pair-Id=K"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "remote"
    files = make_tree(root)
    srv = Server(root)
    srv.files = files
    yield srv
    srv.close()


def download(target, url, models, stdin=None, env_extra=None):
    env = dict(os.environ, TARGET_FOLDER=str(target), DOWNLOAD_RETRIES="2", **(env_extra or {}))
    if url is not None:
        env["PRESIGNED_URL"] = url
    if models is not None:
        env["MODEL_SIZE"] = models
    return subprocess.run(["bash", str(REPO / "download.sh")], input=stdin, capture_output=True, text=True,
                          env=env, timeout=120)


def assert_have(target, server, folders):
    for name in ("LICENSE", "USE_POLICY.md", "tokenizer.model"):
        assert (target / name).read_bytes() == server.files[name]
    for folder in folders:
        for i in range(SHARDS[folder]):
            rel = f"{folder}/consolidated.{i:02d}.pth"
            assert (target / rel).read_bytes() == server.files[rel]
        assert (target / folder / "params.json").exists() and (target / folder / "checklist.chk").exists()
    assert not list(target.rglob("*.part"))


def test_one_model_non_interactive(server, tmp_path):
    res = download(tmp_path / "out", server.url, "7B-chat")
    assert res.returncode == 0, res.stderr
    assert_have(tmp_path / "out", server, ["llama-2-7b-chat"])
    assert not (tmp_path / "out" / "llama-2-7b").exists()
    assert "Done: 3 files verified" in res.stdout  # tokenizer, shard, params.json


def test_two_models_via_prompts(server, tmp_path):
    res = download(tmp_path / "out", None, None, stdin=f"{server.url}\n7B,13B\n")
    assert res.returncode == 0, res.stderr
    assert_have(tmp_path / "out", server, ["llama-2-7b", "llama-2-13b"])


def test_empty_list_means_all_models(server, tmp_path):
    res = download(tmp_path / "out", server.url, "")
    assert res.returncode == 0, res.stderr
    assert_have(tmp_path / "out", server, list(SHARDS))
    assert "Done: 29 files verified" in res.stdout  # 1 + (2 + 3 + 9) * 2


def test_resume_of_a_truncated_file(server, tmp_path):
    target = tmp_path / "out"
    rel = "llama-2-13b/consolidated.01.pth"
    (target / "llama-2-13b").mkdir(parents=True)
    (target / (rel + ".part")).write_bytes(server.files[rel][:50_000])  # interrupted download
    (target / "llama-2-13b" / "consolidated.00.pth").write_bytes(server.files["llama-2-13b/consolidated.00.pth"][:7])
    res = download(target, server.url, "13B")
    assert res.returncode == 0, res.stderr
    assert (rel, "bytes=50000-") in server.requests
    assert ("llama-2-13b/consolidated.00.pth", "bytes=7-") in server.requests  # a partial left under the final name
    assert_have(target, server, ["llama-2-13b"])
    # A second run downloads no weights again.
    server.requests.clear()
    res = download(target, server.url, "13B")
    assert res.returncode == 0, res.stderr
    assert not [p for p, _ in server.requests if p.endswith(".pth") or p == "tokenizer.model"]
    assert "Already have llama-2-13b/consolidated.01.pth (md5 verified)" in res.stdout


def test_corrupted_file_fails_clearly(server, tmp_path):
    server.corrupt.add("llama-2-7b/consolidated.00.pth")
    res = download(tmp_path / "out", server.url, "7B")
    assert res.returncode != 0
    assert "checksum mismatch for" in res.stderr and "llama-2-7b/consolidated.00.pth" in res.stderr
    assert "run download.sh again" in res.stderr
    assert not (tmp_path / "out" / "llama-2-7b" / "consolidated.00.pth").exists()
    assert not list((tmp_path / "out").rglob("*.part"))
    server.corrupt.clear()  # the server is fixed: a re-run completes
    assert download(tmp_path / "out", server.url, "7B").returncode == 0


def test_expired_url_gets_403_hint(server, tmp_path):
    res = download(tmp_path / "out", server.url.replace(SIGNATURE, "Signature=expired"), "7B")
    assert res.returncode != 0
    assert "403" in res.stderr and "expire after 24 hours" in res.stderr and "new URL" in res.stderr
    assert not list((tmp_path / "out").rglob("*.part")) and not (tmp_path / "out" / "LICENSE").exists()


def fake_wget(tmp_path, log, status):
    """A wget on PATH that prints `log` as wget's messages and exits with `status`; returns env for download()."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "wget").write_text(f"#!/bin/sh\ncat >&2 <<'EOF'\n{log}EOF\nexit {status}\n")
    (bin_dir / "wget").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


WGET_START = (
    "--2024-01-01 12:00:00--  https://download.llamameta.net/LICENSE?Policy=abc\n"
    "Connecting to download.llamameta.net (download.llamameta.net)|18.1.1.1|:443... connected.\n"
)


@pytest.mark.parametrize("log, status, message", [
    # A network failure after the server had announced a size with '403' in it.
    (WGET_START + "HTTP request sent, awaiting response... 200 OK\nLength: 4030403 (3.8M) [binary/octet-stream]\n"
     "Saving to: 'LICENSE.part'\n 403K .......... 10%\nRead error at byte 403403/4030403 (Connection reset by peer).\n"
     "Giving up.\n", 4, "could not download LICENSE after 2 attempts (network failure"),
    # A server error other than 403, with '403' in the size of an earlier response.
    ("Length: 4030403 (3.8M)\n" + WGET_START + "HTTP request sent, awaiting response... 503 Service Unavailable\n"
     "2024-01-01 12:00:00 ERROR 503: Service Unavailable.\n", 8, "answered LICENSE with an error (HTTP 503"),
], ids=["network-failure", "server-error-503"])
def test_403_elsewhere_in_the_log_is_not_an_expired_url(tmp_path, log, status, message):
    res = download(tmp_path / "out", f"http://127.0.0.1:1/*?{SIGNATURE}", "7B", env_extra=fake_wget(tmp_path, log, status))
    assert res.returncode != 0
    error = res.stderr.splitlines()[-1]
    assert message in error, res.stderr
    assert "Forbidden" not in error and "expire" not in error


def test_403_status_line_is_an_expired_url(tmp_path):
    log = WGET_START + "HTTP request sent, awaiting response... 403 Forbidden\n2024-01-01 12:00:00 ERROR 403: Forbidden.\n"
    res = download(tmp_path / "out", f"http://127.0.0.1:1/*?{SIGNATURE}", "7B", env_extra=fake_wget(tmp_path, log, 8))
    assert res.returncode != 0
    assert "HTTP 403 Forbidden" in res.stderr and "expire after 24 hours" in res.stderr and "new URL" in res.stderr


def test_missing_file_is_not_an_expired_url(server, tmp_path):
    (server.root / "USE_POLICY.md").unlink()  # the real server answers 404
    res = download(tmp_path / "out", server.url, "7B")
    assert res.returncode != 0
    assert "the server has no USE_POLICY.md (HTTP 404 Not Found)" in res.stderr and "expire" not in res.stderr
    assert (tmp_path / "out" / "LICENSE").exists() and not list((tmp_path / "out").rglob("USE_POLICY.md*"))


HTML_PAGES = [
    ("LICENSE", b"<!DOCTYPE html>\n<html><body>Request has expired</body></html>\n"),
    ("USE_POLICY.md", b"\n\n  <HTML><HEAD><TITLE>Access Denied</TITLE></HEAD></HTML>\n"),
    ("LICENSE", b'\xef\xbb\xbf<?xml version="1.0" encoding="UTF-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">\n'),
]


@pytest.mark.parametrize("name, page", HTML_PAGES, ids=["doctype", "blank-lines-uppercase", "bom-xml-prolog"])
def test_html_page_instead_of_license_fails_and_is_not_kept(server, tmp_path, name, page):
    (server.root / name).write_bytes(page)  # served with 200 OK, as an expired URL's error page can be
    target = tmp_path / "out"
    res = download(target, server.url, "7B")
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1, res.stderr
    assert f"HTML page instead of {name}" in errors[0] and "expired" in errors[0] and "new URL" in errors[0]
    assert not (target / name).exists() and not list(target.rglob("*.part"))
    assert not (target / "tokenizer.model").exists()  # it stopped there


def test_html_license_from_an_earlier_run_is_downloaded_again(server, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "LICENSE").write_bytes(HTML_PAGES[0][1])  # kept by an older download.sh
    (target / "USE_POLICY.md.part").write_bytes(HTML_PAGES[1][1])  # an HTML partial is not resumed either
    res = download(target, server.url, "7B")
    assert res.returncode == 0, res.stderr
    assert "LICENSE is an HTML page, not LICENSE: downloading it again" in res.stdout
    assert ("LICENSE", None) in server.requests and ("USE_POLICY.md", None) in server.requests
    assert_have(target, server, ["llama-2-7b"])
    # A verified-looking LICENSE is kept on the next run.
    server.requests.clear()
    res = download(target, server.url, "7B")
    assert res.returncode == 0, res.stderr
    assert "Already have LICENSE" in res.stdout and not [p for p, _ in server.requests if p == "LICENSE"]


def test_unknown_model_rejected_before_download(server, tmp_path):
    res = download(tmp_path / "out", server.url, "7B,8B")
    assert res.returncode != 0
    assert "unknown model '8B'" in res.stderr and "7B,13B,70B,7B-chat,13B-chat,70B-chat" in res.stderr
    assert server.requests == []


def test_network_failure_after_bounded_retries(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/*?{SIGNATURE}"  # nothing listens there
    res = download(tmp_path / "out", url, "7B")
    assert res.returncode != 0
    assert "could not download LICENSE after 2 attempts" in res.stderr


def test_help():
    res = subprocess.run(["bash", str(REPO / "download.sh"), "--help"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0 and "PRESIGNED_URL" in res.stdout and "MODEL_SIZE" in res.stdout
