"""A small Hugging Face Hub on 127.0.0.1, for the real ``huggingface_hub`` client.

:class:`FakeHub` answers the routes huggingface_hub 2.4 calls for ``create_repo`` + ``upload_folder``
(``POST /api/repos/create``, ``GET /api/models/{repo}``, ``POST .../preupload/{rev}`` answering
``uploadMode: regular`` for every file, ``POST .../commit/{rev}`` with NDJSON and base64 contents,
``POST /api/validate-yaml``) and keeps what was committed, so a test can compare it byte for byte.
The fixtures ``online`` and ``fake_hub`` reach every test through conftest.py.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from huggingface_hub import constants

TOKEN = "hf_TestSecretToken0123456789abcdef"
NAMESPACE = "tester"  # whose namespace a bare repo name lands in


class FakeHub:
    """The Hub endpoints an upload uses, in a thread; ``repos[repo_id][path] = bytes``."""

    def __init__(self, token: str = TOKEN, reject_card: bool = False):
        self.token = token
        self.reject_card = reject_card
        self.repos: dict[str, dict[str, bytes]] = {}
        self.created: list[dict] = []  # create payloads
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        self.unknown: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._route(self, "GET")

            def do_POST(self):
                hub._route(self, "POST")

            def do_HEAD(self):
                hub._route(self, "HEAD")

        return Handler

    def _reply(self, h, status: int, body: dict | None = None, headers: dict | None = None):
        data = json.dumps(body if body is not None else {}).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _route(self, h, method: str):
        path = h.path.split("?")[0]
        auth = h.headers.get("Authorization")
        body = h.rfile.read(int(h.headers.get("Content-Length") or 0))
        self.requests.append((method, path, auth))
        parts = path.strip("/").split("/")
        if auth != f"Bearer {self.token}":
            return self._reply(h, 401, {"error": "Invalid credentials"}, {"X-Error-Message": "Invalid credentials in Authorization header"})
        if method == "POST" and path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except yaml.YAMLError as e:
                return self._reply(h, 400, {"errors": [{"message": str(e)}]})
            if self.reject_card:
                return self._reply(h, 400, {"errors": [{"message": '"model-index[0].results" is invalid'}]})
            return self._reply(h, 200, {"errors": [], "warnings": []})
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            self.created.append(payload)
            repo_id = f"{payload.get('organization') or NAMESPACE}/{payload['name']}"
            if repo_id in self.repos:
                return self._reply(h, 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"})
            self.repos[repo_id] = {}
            return self._reply(h, 200, {"url": f"{self.url}/{repo_id}"})
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id = "/".join(parts[2:4])
            if repo_id not in self.repos:
                return self._reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            if method == "GET" and len(parts) == 4:
                return self._reply(h, 200, {"id": repo_id, "sha": "0" * 40, "siblings": []})
            if method == "POST" and len(parts) >= 6 and parts[4] == "preupload":
                files = json.loads(body)["files"]
                return self._reply(h, 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if method == "POST" and len(parts) >= 6 and parts[4] == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                assert lines[0]["key"] == "header"
                for line in lines[1:]:
                    assert line["key"] == "file" and line["value"]["encoding"] == "base64", line["key"]
                    self.repos[repo_id][line["value"]["path"]] = base64.b64decode(line["value"]["content"])
                return self._reply(h, 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{'1' * 40}", "commitOid": "1" * 40, "pullRequestUrl": None})
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent detection; optional
            return self._reply(h, 404, {"error": "not here"})
        self.unknown.append(f"{method} {path}")
        return self._reply(h, 404, {"error": f"no route {method} {path}"})


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def online(monkeypatch, tmp_path):
    """Online mode, no ambient token; HF_HUB_OFFLINE and the token path are read at import, hence the patches."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_hub(online):
    with FakeHub() as server:
        yield server
    assert not server.unknown, f"the client called routes the fake Hub lacks: {server.unknown}"


def metadata(card: bytes) -> dict:
    return yaml.safe_load(card.decode().split("---")[1])
