"""A hang watchdog per rank, and the exit statuses a launcher reads to decide on a requeue.

    wd = Watchdog(cfg, rank, world)   # after the process group is up
    wd.doing("step 12: waiting for data")
    wd.progress(step)                 # after every optimizer step
    wd.stop()

A rank that makes no progress for max(train.hang_timeout_s, STEP_FACTOR x its typical step time)
writes every thread's stack (faulthandler) to RUN/hangs/, logs one line naming itself, its host,
what it was doing and which peers were silent, and exits with EXIT_HUNG: a stuck collective never
ends by itself (a SIGSTOPped peer keeps its sockets open), so a deadline is the only way out.

Which peer stopped: each rank's watchdog thread posts a heartbeat (time, step, what it is doing)
to the job's rendezvous store (torchrun's agent, or rank 0's TCPStore under srun) every few
seconds, and a firing rank reads them all back: a peer whose heartbeat is old is stopped, or its
host is gone; a peer with a fresh heartbeat at a lower step is where the job waits.
"""
from __future__ import annotations

import faulthandler
import json
import os
import socket
import sys
import tempfile
import threading
import time
from datetime import timedelta

# Exit statuses of a rank that a launcher may requeue after (launch.job reads them).
EXIT_STOPPED = 1  # config error, bad data, divergence, another trainer: requeueing would fail the same way
EXIT_ORPHANED = 70  # its launcher died
EXIT_HUNG = 75  # no progress within the watchdog's deadline
EXIT_PEER_LOST = 76  # a collective failed or timed out: a peer crashed, stopped or lost its host
EXIT_PREEMPTED = 77  # the scheduler's signal: a state was saved at the step boundary
EXIT_CRASHED = 78  # an unexpected exception (its traceback is in the rank's log)
RETRYABLE = {EXIT_ORPHANED: "launcher_lost", EXIT_HUNG: "hang", EXIT_PEER_LOST: "peer_lost",
             EXIT_PREEMPTED: "preempted", EXIT_CRASHED: "crashed"}

STEP_FACTOR = 10  # a step this many times slower than the typical one is a hang (with the floor)
BEAT_S = 5.0  # heartbeats to the store
SILENT_S = 3 * BEAT_S  # a peer whose heartbeat is older is stopped, or its host is gone
STORE_TIMEOUT_S = 5.0

_fatal_hooks: list = []  # fn(exit_status, reason_line): run before a rank leaves by os._exit


def on_fatal(fn) -> None:
    """Run fn(status, line) before this process exits from a thread (hang, orphaned): a launcher
    requeues the job there, since the main thread never gets back to it."""
    _fatal_hooks.append(fn)


def run_fatal_hooks(status: int, line: str) -> int:
    """The hooks, bounded; returns the exit status, which a hook may replace (the local executor
    requeues on a status of its own)."""
    for fn in list(_fatal_hooks):
        try:
            status = fn(status, line) or status
        except Exception as e:  # noqa: BLE001 - leaving regardless
            print(f"[watchdog] exit hook failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return status


def record_line(line: str) -> None:
    """A rank's last word, also in torchrun's error file for this rank (TORCHELASTIC_ERROR_FILE):
    torchrun's report, and launch.torchrun's last line, then give the cause, not a traceback."""
    global last_line
    last_line = line
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            with open(path, "w") as f:
                json.dump({"message": line, "timestamp": int(time.time())}, f)
        except OSError:
            pass


last_line = ""  # the line this process stopped with (launch.job logs it with a requeue)


def _store():
    """A client of the job's rendezvous store with a short timeout (its own connection: the process
    group's may be stuck in a collective)."""
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=timedelta(seconds=STORE_TIMEOUT_S), wait_for_workers=False)


class Watchdog:
    def __init__(self, run_dir: str, rank: int, world: int, floor_s: float, first_s: float):
        self.run_dir, self.rank, self.world = run_dir, rank, world
        self.floor_s, self.first_s = floor_s, first_s  # first_s: until the first step (compile, loader start)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.step, self.what = -1, "starting"
        self.last = time.monotonic()
        self.step_times: list[float] = []
        self._stop = threading.Event()
        self.store, self.store_error = None, ""
        if world > 1:
            try:
                self.store = _store()
            except Exception as e:  # noqa: BLE001 - the watchdog works without peers' news
                self.store_error = f"{type(e).__name__}: {e}"
        self._thread = threading.Thread(target=self._watch, name="rin-hang-watchdog", daemon=True)

    # -- called by the training loop (cheap: attribute writes)
    def doing(self, what: str) -> None:
        self.what = what

    def progress(self, step: int) -> None:
        now = time.monotonic()
        if self.step >= 0:
            self.step_times = (self.step_times + [now - self.last])[-50:]
        self.step, self.last = step, now

    def limit(self) -> float:
        if self.step < 0:
            return max(self.first_s, self.floor_s)
        typical = sorted(self.step_times)[len(self.step_times) // 2] if self.step_times else 0.0
        return max(self.floor_s, STEP_FACTOR * typical)

    def start(self) -> "Watchdog":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Ended and its store client closed before the interpreter exits: a daemon thread left inside a
        store call while torch's objects are torn down aborts the process ("terminate called without
        an active exception", exit -6) after a run that finished."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(STORE_TIMEOUT_S + 2.0)
        self.store = None

    # -- the thread
    def _beat(self) -> None:
        if self.store is not None:
            row = {"t": time.time(), "step": self.step, "doing": self.what, "host": self.host, "pid": self.pid}
            try:
                self.store.set(f"rin/watchdog/{self.rank}", json.dumps(row))
            except Exception as e:  # noqa: BLE001 - the store's host may be the one that hangs
                self.store_error = f"{type(e).__name__}: {e}"

    def _watch(self) -> None:
        # The first beat at once: a rank stopped within a second of starting (a small model reaches
        # step 6 by then) had never beaten, and its peers' lines said "no heartbeat at all".
        next_beat = 0.0
        while True:
            now = time.monotonic()
            if now >= next_beat:
                self._beat()
                next_beat = now + BEAT_S
            idle = now - self.last
            if idle > self.limit():
                self.fire(idle)
            if self._stop.wait(1.0):
                return

    def peers(self, ranks=None) -> dict[int, dict]:
        """The last heartbeat of every other rank, or of `ranks` ({} where the store does not answer).
        One check and one multi-get for all of them once each has beaten (every rank beats as its
        watchdog starts): at 512 ranks a firing rank makes 2 requests, not 1,022, while its peers,
        which fire at about the same moment, do the same to one store."""
        ranks = [r for r in (range(self.world) if ranks is None else ranks) if r != self.rank]
        keys = [f"rin/watchdog/{r}" for r in ranks]
        found = {}
        if self.store is None or not ranks:
            return found
        try:
            if self.store.check(keys):
                return {r: json.loads(v) for r, v in zip(ranks, self.store.multi_get(keys))}
            for r, key in zip(ranks, keys):  # some never beat: ask for each (get would wait for it)
                if self.store.check([key]):
                    found[r] = json.loads(self.store.get(key))
        except Exception as e:  # noqa: BLE001 - the store itself may be gone with its host
            self.store_error = f"{type(e).__name__}: {e}"
        return found

    def settled_peers(self) -> dict[int, dict]:
        """peers() once each tells alive from stopped: a heartbeat newer than at the first look (its
        process runs: its watchdog thread beats even while its main thread waits in a collective)
        or older than SILENT_S (stopped, or its host gone). A peer stopped just before this rank
        fired still has a recent heartbeat, and was once reported as waiting too; this waits for
        the answer, SILENT_S and a second at most, asking again only for the undecided."""
        first = self.peers()
        peers = dict(first)
        deadline = time.time() + SILENT_S + 1.0
        while time.time() < deadline:
            undecided = [r for r, p in peers.items() if time.time() - p["t"] <= SILENT_S and p["t"] == first[r]["t"]]
            if not undecided:
                break
            time.sleep(1.0)
            peers.update(self.peers(undecided))
        return peers

    def verdict(self, peers: dict[int, dict]) -> str:
        """Which peers the job waits for, in words."""
        now, silent, behind = time.time(), [], []
        for r, p in sorted(peers.items()):
            age = now - p["t"]
            if age > SILENT_S:
                silent.append(f"rank {r} (host {p['host']}, pid {p['pid']}) silent for {age:.0f} s after step "
                              f"{max(p['step'], 0)}, {p['doing']}: stopped, or its host is lost")
            elif p["step"] < self.step or p["doing"] != self.what:
                behind.append(f"rank {r} (host {p['host']}) at step {p['step']}, {p['doing']}")
        missing = [str(r) for r in range(self.world) if r != self.rank and r not in peers]
        parts = silent + behind
        if missing and self.world > 1:
            parts.append(f"no heartbeat at all from rank(s) {', '.join(missing[:8])}"
                         + (f" (the store: {self.store_error[:200]})" if self.store_error else ""))
        return "; ".join(parts) if parts else "every peer waits as well"

    def fire(self, idle: float) -> None:
        from . import storage

        peers = self.settled_peers()
        what = self.what + _stopped_workers()
        line = (f"[train] rank {self.rank} (host {self.host}, pid {self.pid}) hung: no progress for {idle:.0f} s "
                f"after step {max(self.step, 0)} while {what}; {self.verdict(peers)}")
        line = " ".join(line.split())  # one line, whatever the store's errors say
        name = f"step-{max(self.step, 0):09d}-rank-{self.rank:05d}-{self.host}-{self.pid}.txt"
        dump = storage.join(storage.join(self.run_dir, "hangs"), name) if self._dump(line, peers, name) else ""
        line += (f". Every thread's stack: {dump}" if dump else "") + \
            "; exiting so the job ends (a launcher requeues it; re-run the same command to resume)"
        record_line(line)
        print(line, file=sys.stderr, flush=True)
        leave(run_fatal_hooks(EXIT_HUNG, line))

    def _dump(self, line: str, peers: dict, name: str) -> bool:
        """Stacks to a local file first (faulthandler writes to a file descriptor), then to RUN/hangs/
        (an upload with a bounded wait: storage may be what hangs)."""
        from . import storage

        local = storage.is_local(self.run_dir)
        folder = os.path.join(storage.local_path(self.run_dir), "hangs") if local else tempfile.mkdtemp("rin_hang")
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "w") as f:
                f.write(line + "\n\npeers' last heartbeats:\n" + json.dumps(peers, indent=1) + "\n\n")
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
        except OSError as e:
            print(f"[watchdog] could not write the stack dump: {e}", file=sys.stderr, flush=True)
            return False
        files = [name] + _nccl_trace(folder, name)
        if local:
            return True

        def upload():
            for n in files:
                with open(os.path.join(folder, n), "rb") as f:
                    storage.write_bytes(storage.join(storage.join(self.run_dir, "hangs"), n), f.read())

        up = threading.Thread(target=upload, daemon=True)
        up.start()
        up.join(30.0)
        return not up.is_alive()


def _nccl_trace(folder: str, name: str) -> list[str]:
    """On GPUs, NCCL's flight recorder (the collectives this rank issued last, and which completed)
    beside the stacks: the file names written, [] where there is no NCCL or it records nothing."""
    import torch
    import torch.distributed as dist

    if not (torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl"):
        return []
    try:
        trace = torch._C._distributed_c10d._dump_nccl_trace()
        out = name.rsplit(".", 1)[0] + "-nccl.pkl"
        with open(os.path.join(folder, out), "wb") as f:
            f.write(trace)
        return [out]
    except Exception as e:  # noqa: BLE001 - the stacks are written; the trace is a bonus
        print(f"[watchdog] no NCCL flight recorder dump: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return []


def _stopped_workers() -> str:
    """", its DataLoader worker pid P is stopped" for this rank's stopped (T) or uninterruptible
    (D) children: a worker that hangs leaves the rank waiting for data with no error."""
    import multiprocessing

    from .lease import _proc_state

    bad = [f"pid {c.pid} ({_proc_state(c.pid)})" for c in multiprocessing.active_children()
           if _proc_state(c.pid) in ("T", "t", "D")]
    return f" (its DataLoader worker(s) {', '.join(bad)} stopped or stuck)" if bad else ""


def leave(status: int) -> None:
    """Children first (DataLoader workers outlive an os._exit), then out."""
    import multiprocessing

    for child in multiprocessing.active_children():
        try:
            child.kill()
        except Exception:  # noqa: BLE001, S110 - leaving regardless
            pass
    os._exit(status)
