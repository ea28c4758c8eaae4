"""--push_to_hub against a local server that speaks just enough of the Hub's HTTP API and records it.

The server answers create-repo, validate-yaml, create-branch, preupload ("regular" mode for every
file, so no LFS or xet transfer happens) and commit (NDJSON). Training runs in real subprocesses with
HF_ENDPOINT pointing at it, a fake token in HF_TOKEN and HF_HUB_OFFLINE unset.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import conversational_rows, score_rows

from dpocache.config import ConfigError
from dpocache.stages.train.config import TrainConfig

TOKEN = "hf_" + "Zq7" * 12
REPO = "acme/tiny-dpo"
MAX_BODY = 64 * 2**20
SERVER_LIFETIME_S = 900


class HubHandler(BaseHTTPRequestHandler):
    """The few Hub endpoints an upload uses; every request is recorded on the server."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
                if len(data) > MAX_BODY:
                    raise ValueError("body too large")
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length)

    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        body = self._body()
        path = self.path.split("?", 1)[0]
        self.server.record(self.command, path, dict(self.headers), body)
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.command == "POST" and path == "/api/repos/create":
            req = json.loads(body)
            repo = f"{req.get('organization') or 'user'}/{req['name']}"
            return self._reply(200, {"url": f"{base}/{repo}", "name": repo, "id": "0" * 24})
        if self.command == "POST" and path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
        if self.command != "POST" or m is None:
            return self._reply(404, {"error": f"not implemented: {self.command} {path}"})
        repo, action = m.group(1), m.group(2)
        if action == "branch":
            return self._reply(200, {})
        if action == "preupload":
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                     for f in json.loads(body)["files"]]
            return self._reply(200, {"files": files})
        oid = "c0ffee" * 6 + "abcd"
        return self._reply(200, {"commitUrl": f"{base}/{repo}/commit/{oid}", "commitOid": oid, "success": True})

    do_POST = do_GET = do_PUT = do_HEAD = _handle


class HubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def record(self, method: str, path: str, headers: dict, body: bytes) -> None:
        with self.lock:
            self.requests.append({"method": method, "path": path, "headers": headers, "body": body})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def paths(self) -> list[str]:
        return [r["path"] for r in self.requests]

    def commits(self) -> list[dict[str, bytes]]:
        """Each commit's files: path -> decoded bytes (from the NDJSON body)."""
        out = []
        for r in self.requests:
            if "/commit/" in r["path"]:
                lines = [json.loads(line) for line in r["body"].splitlines() if line.strip()]
                out.append({it["value"]["path"]: base64.b64decode(it["value"]["content"])
                            for it in lines if it["key"] == "file"})
        return out


@pytest.fixture
def hub():
    server = HubServer()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    guard = threading.Timer(SERVER_LIFETIME_S, server.shutdown)  # stops itself even if a test hangs
    guard.daemon = True
    guard.start()
    yield server
    guard.cancel()
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    return score_rows(tmp_path_factory.mktemp("hub_store"), tiny_model_dir, conversational_rows(8, seed=21))


def hub_env(tmp_path, endpoint: str | None, token: str | None = TOKEN, offline: bool = False) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                        "HF_TOKEN_PATH", "HF_OIDC_RESOURCE", "HF_ENDPOINT")}
    env["HF_HOME"] = str(tmp_path / "hf_home")  # an empty token store
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if endpoint:
        env["HF_ENDPOINT"] = endpoint
    if token:
        env["HF_TOKEN"] = token
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def push_train(model, store, out, env, *extra) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dpocache.cli", "train", "--model_name_or_path", str(model), "--store", str(store),
           "--output_dir", str(out), "--max_train_steps", "2", "--per_device_train_batch_size", "4",
           "--checkpointing_steps", "1", "--push_to_hub", "--hf_repo_id", REPO, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def auth(request: dict) -> str | None:
    return {k.lower(): v for k, v in request["headers"].items()}.get("authorization")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_no_token_anywhere(done: subprocess.CompletedProcess, out) -> None:
    assert TOKEN not in done.stdout + done.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_push_uploads_the_saved_model_in_one_commit(tiny_model_dir, store, tmp_path, hub):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".partial-upload.tmp").write_text("temporary")  # never uploaded
    done = push_train(tiny_model_dir, store, out, hub_env(tmp_path, hub.url), "--hf_repo_revision", "dev",
                      "--with_tracking", "--report_to", "tensorboard")
    assert done.returncode == 0, done.stderr
    assert "push_to_hub: uploaded to" in done.stdout

    create = [r for r in hub.requests if r["path"] == "/api/repos/create"]
    assert len(create) == 1
    payload = json.loads(create[0]["body"])
    assert payload["visibility"] == "private" and payload["organization"] == "acme" and payload["name"] == "tiny-dpo"
    upload_api = {"/api/repos/create", "/api/validate-yaml", f"/api/models/{REPO}/branch/dev",
                  f"/api/models/{REPO}/preupload/dev", f"/api/models/{REPO}/commit/dev"}
    upload = [r for r in hub.requests if r["path"] in upload_api]
    assert {r["path"] for r in upload} == upload_api
    assert all(auth(r) == f"Bearer {TOKEN}" for r in upload)
    assert all(auth(r) in (None, f"Bearer {TOKEN}") for r in hub.requests)  # the token goes nowhere else
    assert all(p.startswith("/api/") for p in hub.paths())

    (files,) = hub.commits()  # one commit
    names = set(files)
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"} <= names
    assert "chat_template.jinja" in names or "chat_template" in json.loads(files["tokenizer_config.json"])
    assert (out / "checkpoints").is_dir() and list(out.rglob("events.out.tfevents.*"))  # they exist locally ...
    assert not any("/" in n or n.startswith(".") for n in names)  # ... but no sub-directory or temp file is sent
    assert "metrics.jsonl" not in names
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert files["README.md"] == (out / "README.md").read_bytes()
    assert_no_token_anywhere(done, out)


def test_push_without_token_fails_before_training(tiny_model_dir, store, tmp_path):
    out = tmp_path / "out"
    done = push_train(tiny_model_dir, store, out, hub_env(tmp_path, "http://127.0.0.1:9", token=None))
    assert done.returncode == 2
    assert "push_to_hub: no Hugging Face token" in done.stderr and "HF_TOKEN" in done.stderr
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.slow
def test_unreachable_hub_keeps_the_local_model_and_says_how_to_retry(tiny_model_dir, store, tmp_path, hub):
    out = tmp_path / "out"
    done = push_train(tiny_model_dir, store, out, hub_env(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    assert done.returncode == 2
    assert "the upload to" in done.stderr and f"saved locally at {out.resolve()}" in done.stderr
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert_no_token_anywhere(done, out)
    retry = re.search(r"upload it later with: (python -m dpocache\.hub .*)$", done.stderr.strip(), re.M)
    assert retry, done.stderr
    cmd = retry.group(1).split()
    cmd[0] = sys.executable
    again = subprocess.run(cmd, capture_output=True, text=True, env=hub_env(tmp_path, hub.url), timeout=300)
    assert again.returncode == 0, again.stderr
    (files,) = hub.commits()
    assert files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert TOKEN not in again.stdout + again.stderr


@pytest.mark.slow
def test_offline_mode_is_a_clear_error(tiny_model_dir, store, tmp_path, hub):
    out = tmp_path / "out"
    done = push_train(tiny_model_dir, store, out, hub_env(tmp_path, hub.url, offline=True))
    assert done.returncode == 2
    assert "offline mode is on (HF_HUB_OFFLINE)" in done.stderr
    assert f"saved locally at {out.resolve()}" in done.stderr and "python -m dpocache.hub" in done.stderr
    assert (out / "model.safetensors").is_file()
    assert hub.requests == []
    assert_no_token_anywhere(done, out)


@pytest.mark.parametrize("kwargs, message", [
    ({"push_to_hub": True}, "push_to_hub needs --hf_repo_id"),
    ({"hf_repo_id": "a/b/c"}, "hf_repo_id"),
    ({"hf_repo_id": "org/bad name"}, "hf_repo_id"),
    ({"hf_repo_id": "org/x--y"}, "hf_repo_id"),
    ({"hf_repo_id": "org/m", "hf_repo_revision": "refs/heads/x"}, "hf_repo_revision"),
    ({"hf_repo_id": "org/m", "hf_repo_revision": "a b"}, "hf_repo_revision"),
])
def test_hub_options_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kwargs)


def test_valid_hub_options():
    cfg = TrainConfig(push_to_hub=True, hf_repo_id="my-model.v2", hf_repo_revision="exp/beta-1")
    assert cfg.hf_private is True
