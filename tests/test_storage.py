"""rin_scale.storage: transient errors are waited out, everything else fails at once; a bucket
outage in the middle of an epoch (a real GCS API server stopped and started again) costs no
sample and changes no batch, and the log says so in one line per worker, without gcsfs's tracebacks."""
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


def test_bucket_outage_mid_epoch_is_waited_out_with_no_sample_lost(tmp_path, monkeypatch, capfd):
    import logging

    from data_tools.shard import main as shard_main

    # What a user's logging setup (or Python's last-resort handler) would print; pytest's own handlers
    # keep records away from stderr, and the DataLoader workers' records from caplog.
    shown = logging.StreamHandler()
    logging.getLogger().addHandler(shown)
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
        err = capfd.readouterr().err
        # one line of ours per outage and worker, not gcsfs's traceback each time its own retries run out
        assert "[storage] waiting for storage while reading gs://outage/" in err, err[-2000:]
        assert "Traceback" not in err and "out of retries" not in err, err[-4000:]
    finally:
        logging.getLogger().removeHandler(shown)
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


def test_gcsfs_traceback_of_a_transient_error_is_quiet_and_others_still_show():
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    keep = Keep()
    gcsfs_log, prefetch_log = logging.getLogger("gcsfs"), logging.getLogger("fsspec.prefetcher")
    logging.getLogger().addHandler(keep)
    try:
        for exc in (ConnectionRefusedError(111, "Connection refused"), PermissionError("403 Forbidden")):
            try:
                raise exc
            except OSError as e:
                gcsfs_log.exception(f"_request out of retries on exception: {e}")
                prefetch_log.error("Global error state set in BackgroundPrefetcher: %s", e)
    finally:
        logging.getLogger().removeHandler(keep)
    assert [(r.name, r.levelname) for r in records] == [("gcsfs", "ERROR"), ("fsspec.prefetcher", "ERROR")]
    assert all(isinstance(r.exc_info[1] if r.exc_info else r.args[0], PermissionError) for r in records)
