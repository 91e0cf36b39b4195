"""Every URL the project reads or writes: local paths, file://, gs://, s3://, memory://, through fsspec.

    fs, path = fs_path("gs://bucket/runs/x/config.yaml")
    write_bytes(url, data)          # atomic: readers see the old bytes or the new, never a part
    with open_read(url) as f: ...   # buffered for object stores (tar headers are many small reads)

Filesystems are made once per process and protocol and never shared across fork (gcsfs is not
fork-safe: gcsfs issue 379), so DataLoader workers and pool processes each make their own.
Transient storage errors (connection refused, timeouts, HTTP 429 and 5xx) are retried with backoff
by `retry`; everything else (missing objects, corrupt bytes, permissions) is raised at once.
gcsfs's and fsspec's own log records of transient errors are demoted to DEBUG: `retry`'s one line
per outage says what is happening.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import re
import time
import uuid

# gcsfs 2026.10 otherwise makes a gRPC/TLS call per bucket to learn its type, which stalls every
# open for about 60 s against an emulator or with no route out; it must be set before the import.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402

READ_BUFFER = 8 << 20  # bytes per ranged read when streaming from a bucket
RETRY_SECONDS = 600.0  # default patience for transient errors: outages of minutes are waited out
CONNECT_SECONDS = 20.0  # at the first contact of a process: an endpoint that never answered is a setup error

_FS_CACHE: dict = {}
_CREDENTIALS: dict = {}  # (protocol, bucket or host) -> storage options taken out of a URL (split_credentials)
_retry_seconds = RETRY_SECONDS  # every retry's default patience (configure)


def configure(retry_seconds: float) -> None:
    """The patience of every storage retry in this process (reads, writes, uploads) when a call names
    none: the trainer sets data.storage_retry_seconds here, so one setting governs all of them.
    DataLoader workers are forked after it is set, and inherit it."""
    global _retry_seconds
    _retry_seconds = float(retry_seconds)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith(("file://", "local://"))


def local_path(url: str) -> str:
    """The POSIX path of a local URL."""
    for prefix in ("file://", "local://"):
        if url.startswith(prefix):
            return url[len(prefix):]
    return url


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/")] + [p.strip("/") for p in parts])


def dirname(url: str) -> str:
    url = url.rstrip("/")
    return url.rsplit("/", 1)[0] if "/" in url else "."


def protocol(url: str) -> str:
    return fsspec.core.split_protocol(url)[0] or "file"


def fs_path(url: str):
    """(filesystem, path) for a URL; one filesystem per process, protocol and credentials (fork-safe).
    Credentials inside the URL (split_credentials) reach the filesystem as storage options, never as
    part of a path or an object name, and are remembered for that bucket (or host) in this process."""
    proto = protocol(url)
    if proto == "local":
        proto = "file"
    url, creds = split_credentials(url)
    place = (proto, _bucket(url))
    if creds:
        _CREDENTIALS[place] = creds
    creds = _CREDENTIALS.get(place, {})
    key = (os.getpid(), proto, tuple(sorted(creds.items())))
    fs = _FS_CACHE.get(key)
    if fs is None:
        kwargs = {"skip_instance_cache": True, **_storage_options(proto, creds)}
        if proto in ("gs", "gcs") and "token" not in kwargs and os.environ.get("STORAGE_EMULATOR_HOST") and \
                not os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            kwargs["token"] = "anon"  # an emulator needs no credentials; probing for them is slow
        if proto in ("gs", "gcs"):
            _check_gcs_reachable(url)
        fs = fsspec.filesystem(proto, **kwargs)
        _FS_CACHE[key] = fs
    return fs, fs._strip_protocol(local_path(url) if proto == "file" else url)


# --------------------------------------------------------------------------------------------
# Credentials inside URLs: `scheme://USER:PASSWORD@bucket/...` (the password may hold slashes, as
# AWS secret keys do) and gs://'s `?token=` / `?access_token=`. gcsfs would take `?token=...` as part
# of the object name, s3fs `KEY:SECRET` as the bucket's: both are taken out here.

_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/?#@:]*):([^@]*)@")
_GS_TOKEN = re.compile(r"([?&])(token|access_token)=([^/&#]*)")


def split_credentials(url: str) -> tuple[str, dict]:
    """(url without its credentials, {"user", "password"} and/or {"token"} taken out of it)."""
    from urllib.parse import unquote

    creds = {}
    m = _USERINFO.match(url)
    if m and "/" in m.group(3) and not url.startswith(("s3://", "s3a://")):
        m = None  # `host:port/path@x`: a slash in a password is for AWS keys only (elsewhere %2F)
    if m:
        creds.update(user=unquote(m.group(2)), password=unquote(m.group(3)))
        url = m.group(1) + url[m.end():]
    if protocol(url) in ("gs", "gcs") and "=" in url:
        def take(t):
            creds["token"] = unquote(t.group(3))
            return "?" if t.group(1) == "?" else ""
        url = _GS_TOKEN.sub(take, url)
        url = re.sub(r"\?&", "?", url).replace("?/", "/")
        url = url[:-1] if url.endswith(("?", "&")) else url
    return url, creds


def _bucket(url: str) -> str:
    """The bucket (or host) of a URL: credentials given for it hold for every object in it."""
    rest = url.split("://", 1)[1] if "://" in url else ""
    return rest.split("/", 1)[0]


def _storage_options(proto: str, creds: dict) -> dict:
    if not creds:
        return {}
    if proto in ("gs", "gcs"):  # an OAuth access token, as is (gcsfs would send a raw one to Google to look up)
        from google.oauth2.credentials import Credentials

        return {"token": Credentials(token=creds.get("token") or creds.get("password"))}
    if proto in ("s3", "s3a"):
        return {"key": creds["user"], "secret": creds["password"]}
    if proto in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"auth": aiohttp.BasicAuth(creds["user"], creds["password"])}}
    return {"username": creds.get("user"), "password": creds.get("password")}


def _check_gcs_reachable(url: str) -> None:
    """One HTTP request to the GCS endpoint before gcsfs is made: with no route to it, gcsfs probes
    for credentials, falls back to anonymous access and retries for about a minute, ending in a
    chain of aiohttp tracebacks. Any HTTP answer (even 401) means the endpoint is there."""
    import socket
    import urllib.error
    import urllib.request

    endpoint = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        creds = f"the key file in GOOGLE_APPLICATION_CREDENTIALS ({os.environ['GOOGLE_APPLICATION_CREDENTIALS']})"
    elif os.environ.get("STORAGE_EMULATOR_HOST"):
        creds = "anonymous (STORAGE_EMULATOR_HOST is set)"
    else:
        creds = "Google application-default credentials (gcloud auth application-default login, or the VM's)"

    def probe():
        try:
            urllib.request.urlopen(endpoint.rstrip("/") + "/storage/v1/b?project=-", timeout=5).close()
        except urllib.error.HTTPError:
            pass  # an answer: reachable
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):  # a name that does not resolve will not start to
                raise StorageUnavailable(f"cannot resolve the GCS endpoint {endpoint} for {url} ({e.reason}); "
                                         f"credentials in use: {creds}") from None
            raise ConnectionError(str(e.reason)) from None

    try:
        retry(probe, f"reaching {endpoint}", seconds=CONNECT_SECONDS, log=lambda m: None)
    except StorageUnavailable as e:
        if "cannot resolve" in str(e):
            raise
        raise StorageUnavailable(f"cannot reach the GCS endpoint {endpoint} for {url} (tried for "
                                 f"{CONNECT_SECONDS:.0f} s); credentials in use: {creds}; check the network, "
                                 f"or STORAGE_EMULATOR_HOST for an emulator") from None


def open_read(url: str):
    """A seekable binary stream; remote files get one large buffer in front, since each small read
    of gcsfs's own cache is a round trip through its event loop (2.6 s instead of 0.05 s for a
    1.4 MB shard read as tar headers and members)."""
    fs, path = fs_path(url)
    f = fs.open(path, "rb")
    return f if is_local(url) else io.BufferedReader(f, READ_BUFFER)


# --------------------------------------------------------------------------------------------
# Whole-object reads and atomic writes


def read_bytes(url: str) -> bytes:
    fs, path = fs_path(url)
    return fs.cat_file(path)


def read_range(url: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of an object in one request (a ranged GET on an object store); fewer at
    its end. Errors as fs.cat_file raises them (the caller retries transient ones)."""
    fs, path = fs_path(url)
    data = fs.cat_file(path, start=int(start), end=int(end))
    # A server that ignores Range (python -m http.server, some proxies) answers with the whole object,
    # which fsspec's HTTP filesystem passes on as if it were the range.
    return data[int(start):int(end)] if len(data) > int(end) - int(start) else data


def write_bytes(url: str, data: bytes) -> None:
    """Atomic: a local file is written beside its name and renamed; an object store commits an
    object only when its upload completes. Transient errors are retried."""
    fs, path = fs_path(url)
    if is_local(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"  # unique per call: threads of one process write too
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    retry(lambda: fs.pipe_file(path, data), f"writing {url}")


def read_json(url: str):
    return json.loads(read_bytes(url))


def write_json(url: str, obj) -> None:
    write_bytes(url, json.dumps(obj, indent=1).encode())


def modified(url: str) -> float:
    """The object's last-modified time (epoch seconds); 0 when the store does not say."""
    fs, path = fs_path(url)
    if is_local(url):
        return os.path.getmtime(path)
    info = retry(lambda: fs.info(path), f"reading {url}")
    when = info.get("updated") or info.get("mtime") or info.get("LastModified") or 0
    if isinstance(when, str):
        import datetime
        when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
    return when.timestamp() if hasattr(when, "timestamp") else float(when)


def exists(url: str) -> bool:
    fs, path = fs_path(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = fs_path(url)
    fs.makedirs(path, exist_ok=True)


def put_dir(local_dir: str, url: str, seconds: float | None = None) -> None:
    """Copy a local folder to `url` (recursive), file by file (put_file)."""
    for base, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(base, name)
            put_file(src, join(url, os.path.relpath(src, local_dir)), seconds)


def put_file(src: str, url: str, seconds: float | None = None) -> None:
    """Upload one local file. A transient failure, or a resumable upload session the server lost
    (restarted; real GCS sessions expire too), uploads it again from its start, within one retry
    budget (`seconds`, default: configure's)."""
    fs, dst = fs_path(url)
    retry(lambda: fs.put_file(src, dst), f"uploading {src} to {url}", seconds,
          transient=lambda e: is_transient(e) or is_lost_upload(e))


# --------------------------------------------------------------------------------------------
# JSON-lines logs (train_log.jsonl, the eval ledger, the launcher's log) whose cost does not grow
# with the run. A local file is appended to. Object stores cannot append, and rewriting the whole
# history at every flush grows with the run: there each append is a new object of the folder
# parts_url(url) (train_log.jsonl -> train_log.parts/), and a reader reads the file (older runs
# wrote one) and then the parts in name order.


def parts_url(url: str) -> str:
    return (url[:-len(".jsonl")] if url.endswith(".jsonl") else url) + ".parts"


def append_jsonl(url: str, rows, part: str | None = None) -> None:
    """Append one row (a dict) or several (a list). On an object store they become one new object,
    named `part` (names must sort in the order written; default: the time in ns)."""
    rows = [rows] if isinstance(rows, dict) else list(rows)
    if not rows:
        return
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if is_local(url):
        path = local_path(url)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        return
    write_bytes(join(parts_url(url), f"{part or f'{time.time_ns():020d}'}.jsonl"), text.encode())


def jsonl_parts(url: str) -> list[str]:
    """The URLs of a log's parts (append_jsonl), in name order: [] for a local file."""
    if is_local(url):
        return []
    fs, path = fs_path(parts_url(url))
    fs.invalidate_cache(path)  # another process appends: a cached listing would hide its parts
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return [join(parts_url(url), n) for n in sorted(n.rsplit("/", 1)[-1] for n in names) if n.endswith(".jsonl")]


def read_jsonl(url: str) -> list[dict]:
    """Every row of a log: the file, then its parts (fetched concurrently). A torn last line from a
    killed writer, or a part deleted while being read, is skipped."""
    try:
        texts = [read_bytes(url)]
    except FileNotFoundError:
        texts = []
    parts = [fs_path(p)[1] for p in jsonl_parts(url)]
    if parts:
        got = fs_path(url)[0].cat(parts, on_error="omit")
        texts += [got[p] for p in parts if p in got]
    return parse_jsonl(b"\n".join(texts))


def last_jsonl_row(url: str, want=lambda row: True) -> dict | None:
    """The last row of a log that `want` accepts, read from the end: the newest parts one by one on
    an object store, the file's last blocks locally. A status check costs the same at step 150,000
    as at step 100, where read_jsonl fetches every part (thousands by then)."""
    for part in reversed(jsonl_parts(url)):
        try:
            rows = [r for r in parse_jsonl(read_bytes(part)) if want(r)]
        except FileNotFoundError:  # dropped by a resume meanwhile
            continue
        if rows:
            return rows[-1]
    if not is_local(url):  # an older bucket run's single file
        rows = [r for r in read_jsonl(url) if want(r)]
        return rows[-1] if rows else None
    try:
        f = open(local_path(url), "rb")
    except FileNotFoundError:
        return None
    with f:
        end = f.seek(0, os.SEEK_END)
        block, tail = 1 << 16, b""
        while True:
            start = max(end - block, 0)
            f.seek(start)
            tail = f.read(end - start) + tail
            lines = tail.split(b"\n")
            # the first line may be cut by the block's start: parsed only once the file's start is in
            rows = [r for r in parse_jsonl(b"\n".join(lines if start == 0 else lines[1:])) if want(r)]
            if rows or start == 0:
                return rows[-1] if rows else None
            end, tail = start, lines[0]


def parse_jsonl(data: bytes) -> list[dict]:
    rows = []
    for line in data.decode().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def remove(url: str) -> None:
    fs, path = fs_path(url)
    retry(lambda: fs.rm(path), f"deleting {url}")


# --------------------------------------------------------------------------------------------
# Transient errors


class StorageUnavailable(RuntimeError):
    """Storage did not answer for longer than the retry budget; the message names the endpoint."""


_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.EPIPE, errno.ECONNABORTED}


def is_transient(exc: BaseException) -> bool:
    """Connection failures, timeouts, HTTP 429 and 5xx: worth waiting out. Not: missing objects,
    permission errors, corrupt bytes. A FileNotFoundError raised *from* a connection failure (fsspec's
    HTTP filesystem reports a refused connection so) is the connection failure: checked by its cause."""
    for e in _chain(exc):
        if isinstance(e, (FileNotFoundError, PermissionError)):
            return e.__cause__ is not None and is_transient(e.__cause__)
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
        code = getattr(e, "code", None) or getattr(e, "status", None)
        if isinstance(code, int) and (code == 429 or 500 <= code < 600):
            return True
        name = type(e).__name__
        # ClientPayloadError: the connection closed mid-body (a server killed while it answered).
        if name in ("ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ServerTimeoutError",
                    "ClientPayloadError", "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
            return True
    return False


def is_lost_upload(exc: BaseException) -> bool:
    """The server forgot a resumable upload session (restarted, or the session expired as real GCS
    sessions do): a 404 on the session's URL. Starting the file's upload again is the fix."""
    return any(isinstance(e, FileNotFoundError) and "upload_id=" in str(e) for e in _chain(exc))


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


class Backoff:
    """Waits between attempts at something that failed transiently: 1 s doubling to 60 s, jittered,
    for up to `seconds` in all; then StorageUnavailable. Logs once that the run is waiting."""

    def __init__(self, what: str, seconds: float | None = None, log=print):
        from .config import mask_secrets  # `what` quotes URLs: these lines reach terminals and job logs

        self.what, self.log = mask_secrets(what), log
        self.seconds = _retry_seconds if seconds is None else seconds
        self.deadline, self.delay = time.monotonic() + self.seconds, 1.0

    def wait(self, exc: BaseException) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            from .config import mask_secrets

            raise StorageUnavailable(f"storage unreachable for {self.seconds:.0f} s while {self.what} "
                                     f"({type(exc).__name__}: {mask_secrets(str(exc))[:200]}); re-run the same command "
                                     f"once it answers") from None
        if self.delay == 1.0:
            self.log(f"[storage] waiting for storage while {self.what} ({type(exc).__name__}); retrying for "
                     f"up to {left:.0f} s")
        time.sleep(min(self.delay * (0.5 + random.random()), left))
        self.delay = min(self.delay * 2, 60.0)


class _QuietTransient(logging.Filter):
    """gcsfs (and fsspec's prefetcher under it) log a full traceback each time gcsfs's own retries
    (about 30 s) run out, though `retry` and the loader then wait on: an outage of minutes would fill
    the log with what looks like crashes. Records of a transient error, as exc_info or as an argument,
    become DEBUG (kept only where that is enabled); other errors still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        excs = [e for e in (record.exc_info[1] if record.exc_info else None, *args) if isinstance(e, BaseException)]
        if record.levelno <= logging.DEBUG or not any(is_transient(e) for e in excs):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


# A logger's filters see only the records made at that logger, not its children's: each one used.
for _name in ("gcsfs", "gcsfs.credentials", "gcsfs.zonal_file", "fsspec", "fsspec.asyn", "fsspec.prefetcher"):
    logging.getLogger(_name).addFilter(_QuietTransient())


def retry(fn, what: str, seconds: float | None = None, log=print, transient=is_transient):
    """fn() until it succeeds, waiting out transient errors (Backoff; `seconds` defaults to configure's);
    other errors raise at once."""
    backoff = Backoff(what, _retry_seconds if seconds is None else seconds, log)
    while True:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified just below
            if not transient(e):
                raise
            backoff.wait(e)
