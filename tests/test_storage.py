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


def epoch(cfg, server=None, outage_after=None, down=0.0):
    """(sample keys, errors) of one epoch of 8-sample batches; the server stopped after batch
    `outage_after` (the next shards' opens fail) and started again `down` seconds later."""
    loader = ShardLoader(cfg.data, cfg.model, batch_size=8)
    keys = []
    for i, batch in enumerate(loader):
        keys += batch["key"]
        if i == outage_after:
            server.stop()
            threading.Timer(down, server.start).start()
        if loader.position == len(loader):
            return keys, loader.stats["errors"]


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

        baseline, _ = epoch(cfg)
        t0 = time.time()
        keys, errors = epoch(cfg, server, outage_after=3, down=40.0)  # longer than gcsfs's own retries
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


def test_upload_whose_session_the_server_forgot_starts_again(tmp_path, capfd):
    """fake-gcs-server restarted in the middle of a resumable upload forgets the session (404 on its
    upload_id URL), as real GCS does when a session expires: the file's upload starts again."""
    server = RestartableGCS(tmp_path / "gcs")
    server.start()
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = server.url
    storage._FS_CACHE.clear()
    try:
        fs, _ = storage.fs_path("gs://cut")
        fs.mkdir("cut")
        (tmp_path / "state").mkdir()
        src = tmp_path / "state" / "state.bin"
        data = os.urandom(1 << 20) * 120  # 120 MiB: gcsfs uploads it in resumable chunks of 50 MiB
        src.write_bytes(data)

        def outage():
            time.sleep(0.5)  # the session is open, its first chunk on the way (about 1 s per chunk here)
            server.stop()
            time.sleep(3)
            server.start()

        t = threading.Thread(target=outage)
        t.start()
        storage.put_dir(str(tmp_path / "state"), "gs://cut/states/step-1")
        t.join()
        assert storage.read_bytes("gs://cut/states/step-1/state.bin") == data
        assert "[storage] waiting for storage while uploading" in capfd.readouterr().out
    finally:
        if old is not None:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        server.stop()
        storage._FS_CACHE.clear()


def test_logs_on_a_bucket_add_objects_and_never_rewrite_history(gcs_bucket, tmp_path):
    """train_log.jsonl and TensorBoard on a bucket: each flush adds objects and leaves every earlier
    one as it was (a flush costs the same at any length of the run); every reader sees all rows; a
    resume drops the rows past its step; TensorBoard's own reader reads the folder as one run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from launch import status
    from rin_scale.tblog import TBLog
    from rin_scale.train import TrainLog

    run = f"{gcs_bucket}/run"
    fs, root = storage.fs_path(run)
    log, tb, seen = TrainLog(run, 0, 0), TBLog(run), {}
    for step in range(1, 13):
        log.append({"step": step, "loss": 1.0 / step})
        tb.scalars({"train/loss": 1.0 / step}, step)
        if step % 3 == 0:
            log.flush()
            tb.flush()
            fs.invalidate_cache()
            now = {o["name"]: (o.get("generation"), o["size"]) for o in fs.find(root, detail=True).values()}
            assert {k: now[k] for k in seen} == seen  # nothing written before was rewritten
            assert len(now) > len(seen)
            seen = now
    tb.close()
    assert [r["step"] for r in storage.read_jsonl(storage.join(run, "train_log.jsonl"))] == list(range(1, 13))
    assert status.main([run]) == 0
    local = tmp_path / "tb"
    fs.get(f"{root}/tb/", str(local), recursive=True)
    acc = EventAccumulator(str(local))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 13))
    # launch.status's progress reads the newest part only, not the run's whole history
    reads = []
    real = storage.read_bytes
    storage.read_bytes = lambda u: reads.append(u) or real(u)
    try:
        assert status.progress(run)["step"] == 12 and len(reads) == 1 and "train_log.parts/" in reads[0]
    finally:
        storage.read_bytes = real
    TrainLog(run, 0, 7)  # resumed from the state of step 7: steps 8-12 were lost with the job
    assert [r["step"] for r in storage.read_jsonl(storage.join(run, "train_log.jsonl"))] == list(range(1, 8))


def test_the_last_row_of_a_long_local_log_is_read_from_its_end(tmp_path):
    """last_jsonl_row reads blocks from the end: right across block edges, a torn last line
    skipped, and the whole file walked back when only an early row matches."""
    url = str(tmp_path / "train_log.jsonl")
    rows = [{"step": i, "loss": 1.0 / i, "pad": "x" * (i % 97)} for i in range(1, 5001)]
    storage.append_jsonl(url, [{"event": "start"}] + rows)
    with open(url, "a") as f:
        f.write('{"step": 5001, "lo')  # a writer killed mid-line
    assert os.path.getsize(url) > 4 * 65536
    assert storage.last_jsonl_row(url, lambda r: "step" in r) == rows[-1]
    assert storage.last_jsonl_row(url, lambda r: r.get("step") == 3) == rows[2]
    assert storage.last_jsonl_row(url, lambda r: "event" in r) == {"event": "start"}
    assert storage.last_jsonl_row(url, lambda r: "nothing" in r) is None
    assert storage.last_jsonl_row(str(tmp_path / "none.jsonl")) is None


class RestartableHTTP:
    """`python -m http.server` over a folder, stopped (killed) and started again on one port."""

    def __init__(self, root):
        self.root, self.port, self.proc = str(root), free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self):
        import subprocess
        import sys
        import urllib.request

        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "--directory", self.root], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=10)


def test_http_source_that_goes_down_is_waited_out_not_counted_as_corrupt(tmp_path, capfd):
    """fsspec's HTTP filesystem reports a refused connection as FileNotFoundError: it is an outage
    (waited out, no sample lost), as on gs://; a shard that is really missing (404) is not."""
    from data_tools.shard import main as shard_main

    assert shard_main(["--embedded", "digits", "--split", "heldout", "--shard-size", "20", "--quiet",
                       str(tmp_path / "digits")]) == 0
    server = RestartableHTTP(tmp_path)
    server.start()
    try:
        url = f"{server.url}/digits/data-manifest.json"
        cfg = load_config("tiny", [f"data.shards={url}", "data.workers=2", "data.shuffle_buffer=16",
                                   "data.storage_retry_seconds=120"])
        baseline, _ = epoch(cfg)
        keys, errors = epoch(cfg, server, outage_after=2, down=8.0)
        assert errors == 0 and keys == baseline
        assert "[storage] waiting for storage while reading http://127.0.0.1:" in capfd.readouterr().err
        os.remove(tmp_path / "digits" / "data-000003.tar")  # a real 404: no waiting, counted at once
        err = None
        try:
            storage.retry(lambda: storage.read_bytes(f"{server.url}/digits/data-000003.tar"), "reading", seconds=60)
        except FileNotFoundError as e:
            err = e
        assert err is not None
    finally:
        server.stop()


def test_answers_cut_off_mid_body_are_waited_out_not_counted_as_corrupt(tmp_path):
    """A server that dies while it sends a shard (aiohttp: ClientPayloadError, "not enough data to
    satisfy content length") is an outage: the read is retried and no sample is lost. Here the first
    shard answers are cut after 100 bytes, deterministically (killing a server mid-answer is a race)."""
    import functools
    import http.server

    from data_tools.shard import main as shard_main

    assert shard_main(["--embedded", "digits", "--split", "heldout", "--shard-size", "60", "--quiet",
                       str(tmp_path / "digits")]) == 0
    cut = {"left": 4}

    class CutOff(http.server.SimpleHTTPRequestHandler):
        def copyfile(self, source, outputfile):
            if self.path.endswith(".tar") and cut["left"] > 0:
                cut["left"] -= 1
                outputfile.write(source.read(100))
                self.close_connection = True  # Content-Length promised the whole file
                return
            super().copyfile(source, outputfile)

        def log_message(self, *args):
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port),
                                             functools.partial(CutOff, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = load_config("tiny", [f"data.shards=http://127.0.0.1:{port}/digits/data-manifest.json",
                                   "data.workers=2", "data.storage_retry_seconds=120"])
        keys, errors = epoch(cfg)
        assert cut["left"] == 0 and errors == 0 and len(keys) == len(set(keys)) == 360
    finally:
        server.shutdown()


def test_storage_gone_for_the_whole_retry_window_stops_in_one_line(tmp_path):
    """A DataLoader worker that runs out of data.storage_retry_seconds stops the run with its own
    one-line reason (what `[train] stopped: ...` prints), not "Caught ... in DataLoader worker
    process 0." and the worker's traceback."""
    from data_tools.shard import main as shard_main
    from rin_scale.train import _one_line

    assert shard_main(["--embedded", "digits", "--split", "heldout", "--shard-size", "60", "--quiet",
                       str(tmp_path / "digits")]) == 0
    server = RestartableHTTP(tmp_path)
    server.start()
    cfg = load_config("tiny", [f"data.shards={server.url}/digits/data-manifest.json", "data.workers=2",
                               "data.storage_retry_seconds=2"])
    loader = ShardLoader(cfg.data, cfg.model, batch_size=8)  # lists the shards while the server answers
    server.stop()
    with pytest.raises(storage.StorageUnavailable) as caught:
        next(iter(loader))
    line = _one_line(caught.value)
    assert line.startswith(f"storage unreachable for 2 s while reading {server.url}/digits/") and "\n" not in line, line
