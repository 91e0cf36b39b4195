"""rin_scale.storage: transient errors are waited out, everything else fails at once; a bucket
outage in the middle of an epoch (a real GCS API server stopped and started again) costs no
sample and changes no batch."""
import os
import threading
import time

import pytest

from rin_scale import storage
from rin_scale.config import load_config
from rin_scale.data import ShardLoader
from conftest import free_port, start_fake_gcs


def test_retry_waits_out_transient_errors_and_raises_the_rest_at_once(monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert storage.retry(flaky, "testing", log=lambda m: None) == "ok" and len(calls) == 3

    def missing():
        calls.append(1)
        raise FileNotFoundError("gs://b/x")

    calls.clear()
    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "testing", log=lambda m: None)
    assert len(calls) == 1  # a missing object is not an outage: no retry

    def down():
        raise TimeoutError("timed out")

    with pytest.raises(storage.StorageUnavailable, match="storage unreachable for 0 s while testing"):
        storage.retry(down, "testing", seconds=0, log=lambda m: None)


def test_atomic_local_write_leaves_no_partial_file(tmp_path):
    url = str(tmp_path / "a" / "b.json")
    storage.write_json(url, {"x": 1})
    storage.write_json(url, {"x": 2})
    assert storage.read_json(url) == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["b.json"]


class RestartableGCS:
    """fake-gcs-server on a fixed port with a filesystem backend, so objects survive a restart."""

    def __init__(self, root):
        self.root, self.port = str(root), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self):
        self.proc = start_fake_gcs(self.port, "-backend", "filesystem", "-filesystem-root", self.root)

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_bucket_outage_mid_epoch_is_waited_out_with_no_sample_lost(tmp_path, monkeypatch):
    from data_tools.shard import main as shard_main

    server = RestartableGCS(tmp_path / "gcs")
    server.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
    storage._FS_CACHE.clear()  # filesystems made for another emulator must not be reused
    try:
        fs, _ = storage.fs_path("gs://outage")
        fs.mkdir("outage")
        url = "gs://outage/digits"
        assert shard_main(["--embedded", "digits", "--split", "heldout", "--shard-size", "30", "--quiet", url]) == 0
        cfg = load_config("tiny", [f"data.shards={url}", "data.workers=2", "data.storage_retry_seconds=300"])

        def epoch(outage_after=None):
            loader = ShardLoader(cfg.data, cfg.model, batch_size=8)
            keys = []
            for i, batch in enumerate(loader):
                keys += batch["key"]
                if i == outage_after:
                    server.stop()  # the next shards' opens fail until the server is back
                    threading.Timer(40.0, server.start).start()  # longer than gcsfs's own retries
                if loader.position == len(loader):
                    return keys, loader.stats["errors"]

        baseline, _ = epoch()
        t0 = time.time()
        keys, errors = epoch(outage_after=3)
        assert time.time() - t0 > 35  # the outage really happened and was waited out
        assert errors == 0 and keys == baseline
    finally:
        if server.proc.poll() is None:
            server.stop()
        storage._FS_CACHE.clear()


def test_unreachable_gcs_endpoint_is_one_line_naming_endpoint_and_credentials(tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "STORAGE_EMULATOR_HOST": "http://no-such-host.invalid:1"}
    env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-m", "data_tools.check", "gs://bucket/shards"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and time.time() - t0 < 30 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert "http://no-such-host.invalid:1" in line and "credentials in use: anonymous" in line, line
