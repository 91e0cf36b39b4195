"""One trainer per run directory: RUN/lease.json.

    lease = Lease(run)
    lease.acquire()      # LeaseHeld (one line: who, since when, how to take over) while another holds it
    lease.start()        # rank 0 renews the heartbeat from a background thread
    ...                  # lease.lost is set if another trainer took the run over meanwhile
    lease.release()      # at the end: the file is gone

The lease names its holder: host, pid (rank 0) and the launcher's pid, the job id and attempt
(RIN_JOB_ID / RIN_JOB_ATTEMPT from launch.job, else SLURM_JOB_ID / SLURM_RESTART_COUNT and the
like), when it was taken and its last heartbeat. It is taken over
- at once when its holder ran on this host and its process is gone (same host name, boot and pid
  namespace; the process's start time guards against a reused pid),
- at once when it belongs to an earlier attempt of this same job (a requeued SLURM job: SLURM
  ends every process of the job before it runs it again),
- when its heartbeat is older than the holder's stale_after_s (STALE_BEATS heartbeats; a clock skew
  between hosts of less than that is harmless).

Every change is a compare-and-swap, so two trainers racing to take over one stale lease cannot both
win: a local lease is created with link() (exclusive, and never seen half-written); it is taken over
by the one taker that creates (O_CREAT|O_EXCL) a claim file named after the stale version (inode,
mtime, size) and finds the lease still that version, then renames its own over it; a gs:// lease is written with ifGenerationMatch preconditions
(0 = create). Other object stores (s3://, memory://) get an exclusive create where fsspec offers it
and a check-then-write otherwise (best effort). A holder whose renewal finds the lease changed
under it has lost it (taken over, or deleted by hand) and must stop: `lost` is set.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid

from . import storage

LEASE_NAME = "lease.json"
# Seconds between heartbeats, and heartbeats missed before a lease counts as stale. The holder
# records its own stale_after_s in the lease, and takers judge it by that.
HEARTBEAT_S = float(os.environ.get("RIN_LEASE_HEARTBEAT_S", "30"))
STALE_BEATS = 4
CLAIM_STALE_S = 60.0  # a local takeover claim this old was left by a taker that died holding it
_ATTEMPTS = 8  # compare-and-swap rounds before acquire() gives up on a lease changing under it


class LeaseHeld(RuntimeError):
    """Another live trainer holds the run; the message is one line: who, since when, what to do."""


class LeaseLost(RuntimeError):
    """This trainer's lease was taken over (or deleted) while it ran."""


def _log(msg: str) -> None:
    from .config import mask_secrets  # lines quote the run's URL: no credentials in job logs

    print(f"[lease] {mask_secrets(msg)}", flush=True)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), "" if unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    try:
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return ""


def _proc_state(pid: int) -> str:
    """R, S, D, Z, ... from /proc/PID/stat; "" if unknown."""
    stat = _read_text(f"/proc/{pid}/stat")
    try:
        return stat.rsplit(")", 1)[1].split()[0]
    except IndexError:
        return ""


def machine() -> dict:
    """What makes a pid meaningful: the host name, its boot, and the pid namespace."""
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot_id": _read_text("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def job_identity() -> tuple[str, int]:
    """(job id, attempt) from the launcher or the scheduler; ("", 0) for a job started by hand."""
    job = ""
    for var in ("RIN_JOB_ID", "SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID", "FLUX_JOB_ID"):
        if os.environ.get(var):
            job = os.environ[var]
            break
    # The launcher counts its own requeues; SLURM counts every restart, its own (a lost node, a
    # --requeue on failure) included: the larger is this attempt, so an attempt SLURM restarted by
    # itself still counts as later than the one whose lease it finds.
    attempts = []
    for var in ("RIN_JOB_ATTEMPT", "SLURM_RESTART_COUNT"):
        try:
            attempts.append(int(os.environ.get(var) or 0))
        except ValueError:
            pass
    return job, max(attempts, default=0)


def identity() -> dict:
    """This process as a lease holder."""
    job, attempt = job_identity()
    pid = os.getpid()
    return {**machine(), "pid": pid, "pid_start": _start_ticks(pid), "launcher_pid": os.getppid(),
            "job": job, "attempt": attempt}


def process_gone(holder: dict) -> str:
    """Why the holder's process is certainly gone ("" if it may live): it ran on this machine (host,
    boot, pid namespace) and its pid is no longer there, or is another process now."""
    mine = machine()
    if any(holder.get(k) != mine[k] for k in ("host", "boot_id", "pidns")):
        return ""  # another machine, boot or pid namespace: its pid means nothing here
    try:
        pid = int(holder.get("pid"))
    except (TypeError, ValueError):
        return ""
    if pid == os.getpid() and holder.get("owner") not in _HELD:
        return f"its process {pid} is this one, which holds no lease (an earlier start in this process)"
    if os.path.exists("/proc/self/stat"):
        start = _start_ticks(pid)
        if not start or _proc_state(pid) == "Z":  # a zombie has exited; only its parent has not reaped it
            return f"its process {pid} on {mine['host']} is gone"
        if holder.get("pid_start") and start != holder["pid_start"]:
            return f"its process {pid} on {mine['host']} is gone (the pid is another process's now)"
        return ""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"its process {pid} on {mine['host']} is gone"
    except PermissionError:
        pass
    return ""


_HELD: set = set()  # owner tokens of the leases this process holds now


def _stamp(t) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(float(t)))
    except (TypeError, ValueError, OverflowError):
        return "?"


def describe(holder: dict) -> str:
    """"host H pid P (launcher pid L), job J attempt A" for messages."""
    who = f"host {holder.get('host', '?')} pid {holder.get('pid', '?')}"
    if holder.get("launcher_pid"):
        who += f" (launcher pid {holder['launcher_pid']})"
    if holder.get("job"):
        who += f", job {holder['job']}" + (f" attempt {holder['attempt']}" if holder.get("attempt") else "")
    return who


# --------------------------------------------------------------------------------------------
# Where the lease lives: compare-and-swap on a local file, a GCS object, or (best effort) any store


class _Local:
    """Version: (device, inode, mtime_ns, size) of the file. Every write makes a new file."""

    def __init__(self, url: str):
        self.path = storage.local_path(url)

    def _tmp(self, body: bytes) -> str:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @staticmethod
    def _version(st) -> tuple:
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self):
        """(bytes, version, mtime) or None when there is no lease."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                return f.read(), self._version(st), st.st_mtime
        except FileNotFoundError:
            return None

    def create(self, body: bytes):
        """The new version, or None when a lease exists."""
        tmp = self._tmp(body)
        version = self._version(os.stat(tmp))  # link() keeps the inode and the mtime
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return None
            except OSError:  # a filesystem without hard links: exclusive create, then write
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return None
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
                    f.flush()
                    os.fsync(f.fileno())
                    return self._version(os.fstat(f.fileno()))
            return version
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _set_aside(self, path: str, version):
        """Rename `path` aside; the aside path if it was the file `version` names, else None (a file
        that changed meanwhile is put back: it is not ours to touch)."""
        aside = f"{path}.aside-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return None
        if self._version(os.stat(aside)) == version:
            return aside
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
        os.unlink(aside)
        return None

    def _claim(self, version):
        """The right to replace lease `version`: a file named after that version, created exclusively,
        so one taker of a given stale lease goes on. A claim left by a taker that died holding it (a
        matter of microseconds) is cleared once CLAIM_STALE_S old. Returns its path, or None."""
        claim = f"{self.path}.takeover-{hashlib.sha1(repr(version).encode()).hexdigest()[:16]}"
        for _ in range(2):
            try:
                os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return claim
            except FileExistsError:
                pass
            try:
                st = os.stat(claim)
            except FileNotFoundError:
                continue  # released meanwhile: try once more
            if time.time() - st.st_mtime < CLAIM_STALE_S:
                return None
            aside = self._set_aside(claim, self._version(st))
            if aside is not None:
                os.unlink(aside)
        return None

    def replace(self, body: bytes, version):
        """Replace the lease if it is still `version` (a takeover); the new version, or None. The
        lease is never absent meanwhile (os.replace), so no fresh start slips in."""
        claim = self._claim(version)
        if claim is None:
            return None
        try:
            cur = self.read()
            if cur is None or cur[1] != version:
                return None  # taken over already (its claim was released), renewed, or released
            tmp = self._tmp(body)
            new = self._version(os.stat(tmp))
            os.replace(tmp, self.path)
            return new
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim)

    def renew(self, body: bytes, version):
        """The holder's own rewrite: atomic (os.replace), so the lease never disappears meanwhile."""
        cur = self.read()
        if cur is None or cur[1] != version:
            return None
        tmp = self._tmp(body)
        new = self._version(os.stat(tmp))
        os.replace(tmp, self.path)
        return new

    def delete(self, version) -> bool:
        aside = self._set_aside(self.path, version)
        if aside is not None:
            os.unlink(aside)
        return aside is not None


class _GCS:
    """Version: the object's generation; every write and delete carries an ifGenerationMatch
    precondition (a failed one is HTTP 412, which gcsfs raises as FileExistsError)."""

    def __init__(self, url: str):
        self.fs, path = storage.fs_path(url)
        self.bucket, self.key, _ = self.fs.split_path(path)

    def read(self):
        for _ in range(_ATTEMPTS):
            try:
                meta = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            except FileNotFoundError:
                return None
            gen = int(meta["generation"])
            try:  # pinned to the generation just seen: a newer one is a 404 here, and we look again
                _, body = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media", generation=str(gen))
            except FileNotFoundError:
                continue
            mtime = time.time()
            with contextlib.suppress(Exception):
                mtime = self.fs._parse_timestamp(meta["updated"]).timestamp()
            return body, gen, mtime
        raise OSError(f"gs://{self.bucket}/{self.key} changed {_ATTEMPTS} times while being read")

    def _upload(self, body: bytes, if_generation: int):
        from urllib.parse import quote

        meta = json.dumps({"name": self.key})
        data = (f"--==0==\nContent-Type: application/json; charset=UTF-8\n\n{meta}\n--==0==\n"
                f"Content-Type: application/json\n\n").encode() + body + b"\n--==0==--"
        try:
            j = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o",
                             uploadType="multipart", ifGenerationMatch=str(if_generation), data=data,
                             headers={"Content-Type": 'multipart/related; boundary="==0=="'}, json_out=True)
        except FileExistsError:  # 412: the precondition failed, unless a retried request had succeeded
            cur = self.read()
            return cur[1] if cur is not None and cur[0] == body else None
        return int(j["generation"])

    def create(self, body: bytes):
        return self._upload(body, 0)

    def replace(self, body: bytes, version):
        return self._upload(body, version)

    renew = replace

    def delete(self, version) -> bool:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=str(version))
            return True
        except (FileNotFoundError, FileExistsError):
            return False


class _AnyStore:
    """Other fsspec stores: exclusive create where the store has one, then check-then-write."""

    def __init__(self, url: str):
        self.url = url
        self.fs, self.path = storage.fs_path(url)

    @staticmethod
    def _token(body: bytes):
        with contextlib.suppress(ValueError, TypeError):
            return json.loads(body).get("write")
        return None

    def read(self):
        try:
            body = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return body, (self._token(body), body), time.time()

    def create(self, body: bytes):
        try:
            self.fs.pipe_file(self.path, body, mode="create")
        except FileExistsError:
            return None
        except TypeError:  # no exclusive create here
            if self.fs.exists(self.path):
                return None
            self.fs.pipe_file(self.path, body)
        except Exception as e:  # some stores report the failed precondition as a generic error
            if "412" in str(e) or "Precondition" in str(e) or "exists" in str(e).lower():
                return None
            raise
        return self._token(body), body

    def replace(self, body: bytes, version):
        cur = self.read()
        if cur is None or cur[1] != version:
            return None
        self.fs.pipe_file(self.path, body)
        return self._token(body), body

    renew = replace

    def delete(self, version) -> bool:
        cur = self.read()
        if cur is None or cur[1] != version:
            return False
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path)
        return True


def _store(url: str):
    if storage.is_local(url):
        return _Local(url)
    if storage.protocol(url) in ("gs", "gcs"):
        return _GCS(url)
    return _AnyStore(url)


# --------------------------------------------------------------------------------------------
# The lease


class Lease:
    def __init__(self, run: str, heartbeat: float | None = None, stale_beats: int | None = None, log=_log):
        self.run = run.rstrip("/")
        self.url = storage.join(self.run, LEASE_NAME)
        self.heartbeat = float(heartbeat or HEARTBEAT_S)
        self.stale_after = self.heartbeat * (stale_beats or STALE_BEATS)
        self.log = log
        self.me = identity()
        self.owner = f"{self.me['host']}-{self.me['pid']}-{uuid.uuid4().hex[:8]}"
        self.since: float | None = None
        self.version = None
        self.lost = threading.Event()
        self.lost_reason = ""
        self._store = _store(self.url)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._writes = 0

    def body(self) -> bytes:
        self._writes += 1
        return json.dumps({**self.me, "owner": self.owner, "since": self.since, "time": time.time(),
                           "heartbeat_s": self.heartbeat, "stale_after_s": self.stale_after,
                           "write": f"{self.owner}-{self._writes}"}, indent=1).encode()

    # ---------------------------------------------------------------- taking it

    def takeover_reason(self, holder: dict | None, mtime: float) -> str:
        """Why the lease `holder` (None: unreadable) may be taken now, or "" while its holder may live."""
        stale_after = self.stale_after
        if holder is None:
            age = time.time() - mtime
            return f"the lease is unreadable and {age:.0f} s old" if age > stale_after else ""
        with contextlib.suppress(TypeError, ValueError):
            stale_after = float(holder.get("stale_after_s") or stale_after)
        if holder.get("owner") in _HELD:
            return ""  # this process holds it (another Lease object on the same run)
        gone = process_gone(holder)
        if gone:
            return gone
        job, attempt = self.me["job"], self.me["attempt"]
        try:
            earlier = job and holder.get("job") == job and int(holder.get("attempt") or 0) < attempt
        except (TypeError, ValueError):
            earlier = False
        if earlier:
            return f"it is held by attempt {holder.get('attempt') or 0} of this job {job} (this is attempt {attempt})"
        try:
            age = time.time() - float(holder.get("time"))
        except (TypeError, ValueError):
            return "it has no heartbeat time"
        if age > stale_after:
            return f"no heartbeat for {age:.0f} s (stale after {stale_after:.0f} s)"
        return ""

    def refusal(self, holder: dict | None, mtime: float) -> str:
        if holder is None:
            return (f"{self.url} is being written by another trainer (or is damaged, written {time.time() - mtime:.0f} s "
                    f"ago): if no trainer runs on this run, delete it and re-run")
        try:
            beat = f"last heartbeat {time.time() - float(holder.get('time')):.0f} s ago"
        except (TypeError, ValueError):
            beat = "no heartbeat time"
        try:
            stale = float(holder.get("stale_after_s") or self.stale_after)
        except (TypeError, ValueError):
            stale = self.stale_after
        return (f"{self.run} is in use by another trainer: {describe(holder)}, holding it since "
                f"{_stamp(holder.get('since'))}, {beat}. Stop that trainer (its ranks too) and re-run: its lease is "
                f"taken over once its process is gone (same host) or its heartbeat is {stale:.0f} s old; to "
                f"take over at once, delete {self.url} after stopping it")

    def acquire(self) -> str:
        """Take the lease; returns "" when it was free, else why it was taken over. Raises LeaseHeld
        while a live trainer holds it."""
        _HELD.add(self.owner)  # before the first write: this process's other leases must not judge it dead
        try:
            return self._acquire()
        except BaseException:
            _HELD.discard(self.owner)
            raise

    def _acquire(self) -> str:
        for _ in range(_ATTEMPTS):
            self.since = time.time()
            version = self._store.create(self.body())
            if version is not None:
                self._took(version)
                return ""
            cur = self._store.read()
            if cur is None:
                continue  # released meanwhile
            raw, version, mtime = cur
            try:
                holder = json.loads(raw)
                holder = holder if isinstance(holder, dict) else None
            except (ValueError, UnicodeDecodeError):
                holder = None
            if holder is not None and holder.get("owner") == self.owner:  # our create landed, its answer lost
                self._took(version)
                return ""
            why = self.takeover_reason(holder, mtime)
            if not why:
                raise LeaseHeld(self.refusal(holder, mtime))
            new = self._store.replace(self.body(), version)
            if new is not None:
                self._took(new)
                self.log(f"took over the lease on {self.run} from {describe(holder or {})}: {why}")
                return why
            # changed under us (another taker, or the holder renewed): judge again
        raise LeaseHeld(f"{self.url} kept changing while this trainer tried to take it: another trainer is "
                        f"starting on {self.run}")

    def _took(self, version) -> None:
        self.version = version

    # ---------------------------------------------------------------- keeping it

    def renew(self) -> None:
        """Write a new heartbeat; LeaseLost if the lease is no longer this trainer's."""
        new = self._store.renew(self.body(), self.version)
        if new is not None:
            self.version = new
            return
        cur = self._store.read()
        holder = {}
        if cur is not None:
            with contextlib.suppress(ValueError, UnicodeDecodeError, AttributeError):
                holder = json.loads(cur[0])
            if isinstance(holder, dict) and holder.get("owner") == self.owner:  # our own write, seen late
                self.version = cur[1]
                return
        _HELD.discard(self.owner)
        if cur is None:
            raise LeaseLost(f"{self.url} was deleted while this trainer held it")
        raise LeaseLost(f"{self.url} was taken over by {describe(holder if isinstance(holder, dict) else {})}")

    def start(self) -> None:
        """Renew from a background thread every `heartbeat` seconds until release()."""

        def beat():
            failing = False
            while not self._stop.wait(self.heartbeat):
                try:
                    self.renew()
                    if failing:
                        self.log(f"renewing the lease on {self.run} works again")
                    failing = False
                except LeaseLost as e:
                    self.lost_reason = str(e)
                    self.lost.set()
                    self.log(f"lost: {e}")
                    return
                except Exception as e:  # storage trouble: the next beat tries again
                    if not failing:
                        self.log(f"renewing the lease on {self.run} failed ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''}); retrying every "
                                 f"{self.heartbeat:.0f} s")
                    failing = True

        self._thread = threading.Thread(target=beat, name="rin-lease", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def release(self, timeout: float = 10.0) -> bool:
        """Stop renewing and delete the lease if it is still this trainer's; True when deleted."""
        self.stop(timeout)
        if self.version is None or self.owner not in _HELD:
            return False
        _HELD.discard(self.owner)
        try:
            return self._store.delete(self.version)
        except Exception as e:  # a lease left behind is taken over later: say so, do not fail the run
            self.log(f"could not release {self.url} ({type(e).__name__}: {e}); the next start takes it over "
                     f"once it is stale")
            return False
