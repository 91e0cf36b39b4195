"""Fault drills: what a careful tester does by hand to a run, done by a script, and a table of what
happened (issue #13, "What to show").

    .venv/bin/python bench/faults.py --quick                       # a reduced set: 6-10 minutes here
    .venv/bin/python bench/faults.py                               # everything: about 30 minutes here (hangs: 10)
    .venv/bin/python bench/faults.py --only kills,eval --json faults.json --ref HEAD

Every drill trains the `tiny` preset, made smaller (widths 64, 16 latents, 4 sampling steps), with
DeepSpeed ZeRO-2 on 2 processes under torchrun, 2 DataLoader workers per rank, the default
precision (auto), a global batch of 8 for 12 steps, a state every 2 steps and a snapshot every 4,
on the embedded digits sharded 5 samples to a shard (a 16-sample shuffle buffer, so that the
workers are still opening shards while the run trains). One uninterrupted run of the same config
is the baseline every drill compares with: each step's loss in RUN/train_log.jsonl and the bytes
of every EMA snapshot (RUN/snapshots/step-N/ema.safetensors) must be identical.

Parts (`--only`):
  kills   kill -9 of the whole job (the torchrun launcher's group and each rank's group: torchrun
          starts each rank in a session of its own) at each phase of a save (the snapshot folder,
          the state folder, DeepSpeed's files, rank-R.pt, ema.safetensors, trainer.json,
          COMPLETE: the suite polls for the file and kills then) and at random times, then the
          same command again to resume. Kills are chained (kill, re-run, kill again, ..., re-run
          to the end); each resume is judged by the rows and snapshots the re-run writes.
  outage  a real GCS API server (fake-gcs-server, filesystem backend, restarted on the same port)
          stopped for 10 s, 60 s and 5 min (not with --quick) while the trainer streams its shards
          from gs://, and while it uploads a state (train.run_dir on gs://, train.state_dir local).
          The run must wait and go on: samples substituted (the loader's error count, from the
          trainer's last line), losses and snapshots against the baseline.
  lease   a second trainer started on a run whose first trainer's ranks still live (the same
          command re-run); without --quick also: the launcher alone killed (its ranks orphaned)
          and the command re-run at once, and two trainers started together. Double writers: a
          second trainer that trained while the first's ranks lived, or steps written twice.
  eval    the eval service (python -m evals.service --run RUN --once) killed while it scores a
          snapshot; the next service must score that snapshot within a minute of its start.
  hangs   in 2-task submitit local jobs (launch.submit --executor local, train.hang_timeout_s=30):
          rank 1 stopped (SIGSTOP), rank 1 killed, a DataLoader worker of rank 1 stopped, the
          scheduler's signal; each job must end within the watchdog's time plus a minute (60 s
          for the kill), requeue itself (launch.jsonl's reason) and resume exactly; the stack
          dump in RUN/hangs/ must name the stopped rank; a preemption may lose one step at most.
          A node-local train.state_dir on a 2-node SLURM cluster on loopback (tests/slurm/): one
          line at start-up naming the node, no requeue. And gs:// shards unreachable for 8 minutes
          with the default deadlines: waited out.
  state   train.state_dir on a real tmpfs that holds one state and not two: the second save must stop
          in one line naming the disk, keep the previous complete state and leave no partial folder;
          the same command after the tmpfs is enlarged must resume exactly. And a run to step 8 whose
          newest state has one file truncated (COMPLETE kept): the same command must name the file
          in one line, resume from step 6 and match the baseline. Needs root (mount).

The tables are markdown (the README's Reliability section); --json FILE writes the same as JSON.
--ref HEAD drills a clean copy of a commit rather than the working tree, which others may be
editing while the drills run. The trainers get a torch extension cache of their own (another
virtual environment sharing ~/.cache/torch_extensions makes every start recompile DeepSpeed's op).
Exit status 0 when every drill passed, 1 otherwise. Work files go to a temporary folder (kept when
something failed, or with --keep; its path is printed).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # before any gcsfs import (TESTING.md)

from _faults_proc import GCSServer, Job, alive, kill_mentioning, stop_everything  # noqa: E402

STEPS = 12
SMALL = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
         "model.num_latents=16", "diffusion.sample_steps=4", "train.sample_count=4"]
COMMON = SMALL + ["train.zero_stage=2", "train.global_batch=8", f"train.total_steps={STEPS}", "train.lr=0.02",
                  "train.warmup_steps=100", "train.ema_warmup=true", "train.state_every=2", "train.snapshot_every=4",
                  "train.sample_every=4", "train.log_every=2", "data.workers=2", "data.shuffle_buffer=16"]
SHARD_SIZE = 5
SAVE_STEPS = (4, 6, 8, 10)  # steps whose save a phase kill aims at (4 and 8 also write a snapshot)
SNAPSHOT_STEPS = (4, 8)
# The phases of a save, in the order they happen (rin_scale.train.maybe_save, checkpoint.save_state).
PHASES = ["snapshot", "state folder", "DeepSpeed files", "rank-R.pt", "ema.safetensors", "trainer.json", "COMPLETE"]
EVAL_OVERRIDES = ["eval.num_samples=16", "eval.batch=8", "eval.reference_samples=32"]
EVAL_DEADLINE_S = 60.0
PARTS = ("kills", "outage", "lease", "eval", "hangs", "state")


def step_name(step: int) -> str:
    return f"step-{step:09d}"


def written_since(path: str, since: float) -> bool:
    try:
        return os.stat(path).st_mtime >= since
    except OSError:
        return False


def inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def ended(job: Job, out: str | None = None) -> str:
    """How a job ended, in words: its exit status and the line saying why, or that a signal from
    outside the suite ended it (on a shared machine, someone else's kill)."""
    rc = job.proc.returncode
    if rc is not None and rc < 0 and not job.killed_at:
        return f"killed by signal {-rc} from outside the suite (not one of its kills)"
    why = last_line(job.output() if out is None else out) if rc else ""
    return f"exit {rc}" + (f": {why}" if why else "")


def git(repo: str, *args: str) -> str:
    """A git command's output in `repo`, "" when it fails (not a git checkout)."""
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def nonempty(folder: str) -> bool:
    try:
        return bool(os.listdir(folder))
    except OSError:
        return False


def sha(data: bytes | None) -> str | None:
    return hashlib.sha256(data).hexdigest()[:16] if data is not None else None


WHY = (r"\[train\] stopped", r"config error", r"^error:", r"\[lease\]", r"\[train\] rank \d+: its launcher",
       r"\b(?!ChildFailedError)\w+(Error|Exception): ", r"rror")


def last_line(text: str, patterns=WHY, limit: int = 200) -> str:
    """The line of a job's output that says why it ended: the last line matching the first pattern
    that any line matches (the trainer's own one-line reasons before torchrun's summary), else the
    last line; cut to `limit` characters."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = (lines or [""])[-1]
    for pat in patterns:
        hits = [ln for ln in lines if re.search(pat, ln)]
        if hits:
            line = hits[-1]
            break
    return line if len(line) <= limit else line[:limit - 3].rstrip() + "..."


# --------------------------------------------------------------------------------------------
# A run directory, local or in a bucket of one of our GCS servers


class HTTPServer(GCSServer):
    """`python -m http.server` over a folder on 127.0.0.1:PORT; start() after stop() serves it again
    on the same port (the http outage drill). Stopped, and stopped at exit, as GCSServer is."""

    def start(self, timeout: float = 30.0) -> None:
        import urllib.request

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                          "--directory", self.root], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1).close()
                return
            except OSError:
                if time.time() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"http.server did not start on port {self.port} (log: {self.log_path})")
                time.sleep(0.05)


class RunView:
    def __init__(self, path: str, fs=None):
        self.path, self.fs = path.rstrip("/"), fs  # fs: gcsfs for "bucket/path", None for a local folder

    def _p(self, rel: str) -> str:
        return f"{self.path}/{rel}" if rel else self.path

    def read(self, rel: str) -> bytes | None:
        try:
            if self.fs is None:
                with open(self._p(rel), "rb") as f:
                    return f.read()
            return self.fs.cat_file(self._p(rel))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def exists(self, rel: str) -> bool:
        if self.fs is None:
            return os.path.exists(self._p(rel))
        self.fs.invalidate_cache()
        return self.fs.exists(self._p(rel))

    def ls(self, rel: str) -> list[str]:
        try:
            if self.fs is None:
                return sorted(os.listdir(self._p(rel)))
            self.fs.invalidate_cache()
            return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self._p(rel), detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def rows(self) -> list[dict]:
        """RUN/train_log.jsonl, then (on a bucket) its parts RUN/train_log.parts/*.jsonl in name order."""
        raw = b"\n".join([self.read("train_log.jsonl") or b""] +
                         [self.read(f"train_log.parts/{n}") or b"" for n in self.ls("train_log.parts")])
        out = []
        for line in raw.decode(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed writer
        return out

    def steps(self, kind: str, complete: bool = True) -> list[int]:
        out = []
        for name in self.ls(kind):
            m = re.fullmatch(r"step-(\d{9})", name)
            if m and (not complete or self.exists(f"{kind}/{name}/COMPLETE")):
                out.append(int(m.group(1)))
        return sorted(out)

    def snapshot_hashes(self) -> dict[int, str]:
        return {s: sha(self.read(f"snapshots/{step_name(s)}/ema.safetensors")) for s in self.steps("snapshots")}

    def snapshot_meta(self, step: int) -> dict:
        raw = self.read(f"snapshots/{step_name(step)}/meta.json")
        return json.loads(raw) if raw else {}


def loader_stats(output: str) -> dict | None:
    """The trainer's last line: '[train] done: ...; loader {'samples': N, 'errors': N, 'epoch': N}'."""
    found = re.findall(r"loader (\{[^}]*\})", output)
    if not found:
        return None
    try:
        return ast.literal_eval(found[-1])
    except (ValueError, SyntaxError):
        return None


def precision_of(output: str) -> str | None:
    found = re.findall(r"precision (bf16|fp32) \(", output)
    return found[-1] if found else None


def resumed_at(output: str, had_state: bool) -> int | None:
    """The step a trainer resumed at; 0 for a fresh start (no complete state when it was launched);
    None when it never got that far."""
    m = re.findall(r"resumed from \S+ at step (\d+)", output)
    if m:
        return int(m[-1])
    if had_state:
        return None
    return 0 if re.search(r"\[train\] \d+ rank\(s\) on", output) else None


# --------------------------------------------------------------------------------------------
# The suite


class Baseline:
    def __init__(self, precision: str, losses: dict, snapshots: dict, seconds: float, first_row_s: float, run: str):
        self.precision, self.losses, self.snapshots = precision, losses, snapshots
        self.seconds, self.first_row_s, self.run = seconds, first_row_s, run


class Suite:
    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.repo = os.path.abspath(args.repo)
        self.work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="rin-faults-")
        os.makedirs(self.work, exist_ok=True)
        self.commit = git(self.repo, "rev-parse", args.ref or "HEAD")
        self.changed = [] if args.ref else [ln.split(None, 1)[1] for ln in git(
            self.repo, "status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
        if args.ref:  # a clean copy of that commit: edits others make in the working tree meanwhile stay out
            src = os.path.join(self.work, "src")
            shutil.rmtree(src, ignore_errors=True)
            os.makedirs(src)
            archive = subprocess.run(["git", "archive", self.commit], cwd=self.repo, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
            self.repo = src
        self.seed = args.seed
        self.rng = random.Random(self.seed)
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": self.repo, "PYTHONUNBUFFERED": "1",
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "TOKENIZERS_PARALLELISM": "false"}
        self.env.pop("STORAGE_EMULATOR_HOST", None)
        # DeepSpeed's CPU communication op is compiled once per torch build into torch's extension
        # cache; another virtual environment sharing ~/.cache/torch_extensions makes every start
        # after it compile again (minutes on 2 cores): this interpreter gets a cache of its own.
        self.env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(
            os.path.expanduser("~/.cache/rin_scale/torch_extensions"),
            hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]))
        self.shards = os.path.join(self.work, "digits")
        self.baselines: dict[str, Baseline] = {}
        self.last_full_s = float("inf")  # the shortest uninterrupted training job seen: random kill times
        self._baseline_lock = threading.Lock()
        self.trials: list[dict] = []
        self.summary: dict[str, dict] = {}
        self.t0 = time.time()
        self._n = 0

    # ---------------------------------------------------------------- plumbing

    def log(self, msg: str) -> None:
        print(f"[faults {time.time() - self.t0:6.0f}s] {msg}", file=sys.stderr, flush=True)

    def path(self, *parts) -> str:
        return os.path.join(self.work, *parts)

    def job(self, name: str, args: list[str], env: dict | None = None) -> Job:
        self._n += 1
        log = self.path("logs", f"{self._n:02d}-{name}.log")
        os.makedirs(os.path.dirname(log), exist_ok=True)
        return Job(name, [sys.executable, *args], {**self.env, **(env or {})}, self.repo, log)

    def train(self, name: str, run: str, *extra: str, shards: str | None = None, env: dict | None = None) -> Job:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "rin_scale.train", "tiny",
                f"data.shards={shards or self.shards}", f"train.run_dir={run}", *COMMON, *extra]
        return self.job(name, args, env)

    def make_shards(self) -> None:
        if os.path.exists(os.path.join(self.shards, "data-manifest.json")):
            return
        out = subprocess.run([sys.executable, "-m", "data_tools.shard", "--embedded", "digits", "--split", "train",
                              "--shard-size", str(SHARD_SIZE), "--quiet", self.shards], cwd=self.repo, env=self.env,
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"sharding failed (exit {out.returncode}"
                               + (", a SIGKILL from outside the suite" if out.returncode == -9 else "")
                               + f"): {out.stderr.strip()[-500:]}")
        self.log(out.stdout.strip())

    def record(self, part: str, trial: str, fault: str, hit: str, outcome: str, ok: bool, **extra) -> dict:
        row = {"part": part, "trial": trial, "fault": fault, "hit": hit, "outcome": outcome, "ok": bool(ok), **extra}
        self.trials.append(row)
        self.log(f"{part}/{trial}: {'ok' if ok else 'FAILED'}: {outcome}")
        return row

    # ---------------------------------------------------------------- the baseline

    def baseline(self, precision: str | None = None) -> Baseline:
        """The uninterrupted run; precision=None: as auto chooses; otherwise one pinned to it (for
        a drill whose own auto probe chose the other, on a busy machine)."""
        with self._baseline_lock:
            if precision is not None and precision in self.baselines:
                return self.baselines[precision]
            if precision is None and self.baselines:
                return self.baselines.get("auto") or next(iter(self.baselines.values()))
            name = f"baseline-{precision or 'auto'}"
            run = self.path(name)
            shutil.rmtree(run, ignore_errors=True)
            job = self.train(name, run, *([f"train.precision={precision}"] if precision else []))
            first = None
            while job.running():
                if first is None and os.path.exists(os.path.join(run, "train_log.jsonl")) and \
                        os.path.getsize(os.path.join(run, "train_log.jsonl")) > 0:
                    first = time.time() - job.started
                if time.time() - job.started > 900:
                    job.kill()
                    raise RuntimeError("the baseline run took over 15 minutes")
                time.sleep(0.05)
            out = job.output()
            job.close()
            if job.proc.returncode != 0:
                raise RuntimeError(f"the baseline run failed ({ended(job, out)}; log {job.log_path})")
            view = RunView(run)
            losses = {r["step"]: r["loss"] for r in view.rows()}
            if sorted(losses) != list(range(1, STEPS + 1)):
                raise RuntimeError(f"the baseline run logged steps {sorted(losses)}")
            snaps = view.snapshot_hashes()
            prec = view.snapshot_meta(STEPS).get("precision") or precision_of(out)
            b = Baseline(prec, losses, snaps, job.ended - job.started, first or 0.0, run)
            self.last_full_s = min(self.last_full_s, b.seconds)
            self.baselines[prec] = b
            if precision is None:
                self.baselines["auto"] = b
            self.log(f"baseline ({prec}): {b.seconds:.0f} s, first step after {b.first_row_s:.0f} s, "
                     f"snapshots {sorted(snaps)}, loader {loader_stats(out)}")
            return b

    def compare_rows(self, rows: list[dict], precision: str | None) -> list[str]:
        """Differences between logged rows and the baseline of the same precision ([] = identical)."""
        base = self.baseline(precision) if precision else self.baseline()
        bad = []
        for r in rows:
            want = base.losses.get(r.get("step"))
            if want is None or r.get("loss") != want:
                bad.append(f"step {r.get('step')} loss {r.get('loss')!r} != {want!r}")
        return bad

    def compare_snapshots(self, hashes: dict[int, str], precision: str | None) -> list[str]:
        base = self.baseline(precision) if precision else self.baseline()
        return [f"snapshot step {s} EMA differs" for s, h in sorted(hashes.items()) if base.snapshots.get(s) != h]

    def compare_run(self, view: RunView, output: str = "") -> tuple[bool, str, str]:
        """(identical, why not, precision): every step once with the baseline's loss, every snapshot's
        EMA bytes equal, the final one present."""
        rows = view.rows()
        steps = [r.get("step") for r in rows]
        prec = view.snapshot_meta(STEPS).get("precision") or precision_of(output)
        problems = []
        dup = sorted({s for s in steps if steps.count(s) > 1})
        if dup:
            problems.append(f"steps logged twice: {dup}")
        missing = sorted(set(range(1, STEPS + 1)) - set(steps))
        if missing:
            problems.append(f"steps missing: {missing}")
        problems += self.compare_rows(rows, prec)
        hashes = view.snapshot_hashes()
        if STEPS not in hashes:
            problems.append(f"no final snapshot (step {STEPS})")
        problems += self.compare_snapshots(hashes, prec)
        return not problems, "; ".join(problems[:4]) + (" ..." if len(problems) > 4 else ""), prec or "?"

    # ---------------------------------------------------------------- part 1: kills

    def kill_plan(self) -> list[list[dict]]:
        """Chains of kills: {"phase": name, "step": N}, {"random": "step"} (a random moment of a
        random training step) or {"random": "time"} (a random time after launch: start-up and
        resuming included). A chain's phase targets come at increasing steps (a killed save leaves
        its folder behind until that step is saved again)."""
        phases = list(PHASES)
        self.rng.shuffle(phases)
        if self.quick:
            phases, randoms = phases[:2], [{"random": "step"}]
        else:
            randoms = [{"random": k} for k in ("step", "time", "step", "time", "step")]
        chains = []
        while phases:
            pair, phases = phases[:2], phases[2:]
            if "snapshot" in pair:
                snap = self.rng.choice(SNAPSHOT_STEPS)
                other = [p for p in pair if p != "snapshot"]
                targets = [("snapshot", snap)] + [(o, self.rng.choice([t for t in SAVE_STEPS if t != snap]))
                                                  for o in other]
                targets.sort(key=lambda t: t[1])
            else:
                targets = list(zip(pair, sorted(self.rng.sample(SAVE_STEPS, len(pair)))))
            chain = [{"phase": p, "step": n} for p, n in targets]
            while len(chain) < 3 and randoms:
                chain.append(randoms.pop(0))
            chains.append(chain)
        while randoms:
            chains.append(randoms[:3])
            randoms = randoms[3:]
        return chains

    @staticmethod
    def trigger_path(run: str, phase: str, step: int) -> str:
        s = os.path.join(run, "states", step_name(step))
        return {"snapshot": os.path.join(run, "snapshots", step_name(step)),
                "state folder": s,
                "DeepSpeed files": os.path.join(s, step_name(step)),
                "rank-R.pt": os.path.join(s, "rank-1.pt"),
                "ema.safetensors": os.path.join(s, "ema.safetensors"),
                "trainer.json": os.path.join(s, "trainer.json"),
                "COMPLETE": os.path.join(s, "COMPLETE")}[phase]

    @staticmethod
    def phase_of(run: str, step: int, since: float = 0.0) -> str | None:
        """Which phase of step N's save the files on disk show (None: its save had not begun); only
        files written after `since` count (a killed save leaves its files until it is saved again)."""
        def fresh(path):
            return written_since(path, since)

        s = os.path.join(run, "states", step_name(step))
        snap = os.path.join(run, "snapshots", step_name(step))
        if fresh(os.path.join(s, "COMPLETE")):
            return "COMPLETE"
        if fresh(os.path.join(s, "trainer.json")):
            return "trainer.json"
        if fresh(os.path.join(s, "ema.safetensors")):
            return "ema.safetensors"
        if any(fresh(os.path.join(s, f"rank-{r}.pt")) for r in (0, 1)):
            return "rank-R.pt"
        ds = os.path.join(s, step_name(step))
        if os.path.isdir(ds) and any(fresh(os.path.join(ds, f)) for f in os.listdir(ds)):
            return "DeepSpeed files"
        if os.path.isdir(s) and fresh(s):
            return "state folder"
        if fresh(snap) and not os.path.exists(os.path.join(snap, "COMPLETE")):
            return "snapshot"
        return None

    def observed_phase(self, run: str, resumed: int | None, since: float) -> str:
        """What a kill hit: the save in progress (its phase), else where training was."""
        view = RunView(run)
        complete = view.steps("states")
        newest = complete[-1] if complete else 0
        steps = sorted(set(view.steps("states", complete=False)) | set(view.steps("snapshots", complete=False)))
        for step in reversed([s for s in steps if s > newest]):
            ph = self.phase_of(run, step, since)
            if ph:
                return f"{ph} (step {step})"
        if resumed is None:
            return "start-up (before it resumed)"
        rows = [r for r in view.rows() if r.get("step", 0) > resumed]
        if not rows:
            return f"start-up ({f'resumed at step {resumed}, ' if resumed else ''}before its first step)"
        last = rows[-1].get("step")
        if newest and last == newest and self.phase_of(run, newest, since) == "COMPLETE":
            return f"COMPLETE (step {newest}, the next step not yet logged)"
        return f"training (after step {last})"

    def kill_chain(self, index: int, chain: list[dict]) -> list[dict]:
        """Kill, re-run, kill, ..., re-run to the end; returns the kills not made because a run
        finished before its kill came (to be tried again in a new chain)."""
        run = self.path("kills", f"chain-{index}")
        shutil.rmtree(run, ignore_errors=True)
        base = self.baseline()
        segments = []  # per job: output, resumed step, rows and snapshots it wrote, the kill after it
        leftover: list[dict] = []
        for k, spec in enumerate(chain + [None]):
            view = RunView(run)
            states_before = view.steps("states")
            log_inode = inode(os.path.join(run, "train_log.jsonl"))  # the trainer replaces it when it starts
            job = self.train(f"kills-{index}-{k}", run)
            kill = None
            if spec is not None:
                kill = dict(spec)
                if spec.get("random") == "time":  # within the shortest whole run seen (start-up included)
                    at = self.rng.uniform(2.0, max(3.0, 0.9 * min(base.seconds, self.last_full_s)))
                    kill["target"] = f"a random time, {at:.1f} s after launch"
                    fire = lambda: time.time() - job.started >= at  # noqa: E731
                elif spec.get("random"):
                    u = self.rng.random()
                    delay = self.rng.uniform(0.0, max(0.2, (base.seconds - base.first_row_s) / STEPS))
                    armed: dict = {}
                    kill["target"] = f"a random moment, {delay:.2f} s after a random step was logged"

                    def fire(u=u, delay=delay, armed=armed, kill=kill, job=job, had=bool(states_before)):
                        if "step" not in armed:  # the step: drawn among those this job will train
                            r = resumed_at(job.output(), had)
                            if r is None:
                                return False
                            lo, hi = r + 1, STEPS - 1
                            armed["step"] = lo + int(u * (hi - lo + 1)) if lo <= hi else None
                            if armed["step"] is not None:
                                kill["target"] = f"a random moment, {delay:.2f} s after step {armed['step']} was logged"
                        if armed["step"] is None:
                            return False
                        if "t" not in armed:  # rows of this job: the log it rewrote (a killed job's rows were past r)
                            if inode(os.path.join(run, "train_log.jsonl")) not in (None, log_inode) and \
                                    any(x.get("step") == armed["step"] for x in RunView(run).rows()):
                                armed["t"] = time.time()
                            return False
                        return time.time() - armed["t"] >= delay
                else:
                    path = self.trigger_path(run, spec["phase"], spec["step"])
                    kill["target"] = f"{spec['phase']} of step {spec['step']}"
                    if spec["phase"] == "DeepSpeed files":  # a file in DeepSpeed's own folder
                        fire = lambda: written_since(path, job.started) and nonempty(path)  # noqa: E731
                    else:
                        fire = lambda: written_since(path, job.started)  # noqa: E731
                # Near the save aimed at, look without sleeping (for a few seconds at most): its
                # phases last milliseconds (rank-R.pt, ema.safetensors and trainer.json are small files).
                near = (os.path.join(run, "snapshots", step_name(spec["step"])),
                        os.path.join(run, "states", step_name(spec["step"]))) if "step" in spec else ()
                deadline, spin_until = time.time() + 600, None
                while job.running() and not fire() and time.time() < deadline:
                    if spin_until is None and any(written_since(p, job.started) for p in near):
                        spin_until = time.time() + 3.0
                    if spin_until is not None and time.time() < spin_until:
                        continue
                    job.note_tree(every=0.5)
                    time.sleep(0.002)
                if job.running():
                    if time.time() >= deadline:
                        kill["target"] += " (not seen in 10 minutes: killed then)"
                    job.kill_now()
                if job.running() or job.killed_at:
                    seen_at = job.fired_at or time.time()
                    survivors = job.kill()
                    kill["latency_ms"] = round((job.killed_at - seen_at) * 1000, 1)
                    kill["after_s"] = round(seen_at - job.started, 1)
                    strays = kill_mentioning(run)  # anything of this run the kill did not reach
                    kill["survivors"] = sorted(set(survivors) | set(strays))
                    kill["hit"] = self.observed_phase(run, resumed_at(job.output(), bool(states_before)),
                                                      job.started)
                    done = view.steps("states")
                    kill["newest_complete"] = done[-1] if done else 0
                    self.log(f"kills/chain-{index}: killed at {kill['hit']} ({kill['target']}, "
                             f"{kill['after_s']} s); survivors {kill['survivors']}")
                else:
                    kill["missed"] = f"the run ended ({ended(job)}) before the kill"
            else:
                job.wait(timeout=900)
                if job.running():
                    job.kill()
                elif job.proc.returncode == 0:
                    self.last_full_s = min(self.last_full_s, job.ended - job.started)
            out = job.output()
            job.close()
            r = resumed_at(out, bool(states_before))
            rows = view.rows()
            mine = [x for x in rows if r is not None and x.get("step", 0) > r]
            snaps = {s: h for s, h in view.snapshot_hashes().items() if r is not None and s > r}
            segments.append({"output": out, "resumed": r, "rows": mine, "snapshots": snaps, "kill": kill,
                             "rc": job.proc.returncode, "ended": ended(job, out), "precision": precision_of(out),
                             "log": job.log_path})
            if kill is not None and kill.get("missed") and job.proc.returncode == 0:
                leftover = chain[k:]  # this job trained to the end: it is the chain's last
                segments[-1]["kill"] = None
                self.record("kills", f"chain {index}.{k + 1}", kill["target"], "-",
                            f"{kill['missed']}: this kill and the {len(leftover) - 1} after it go to a new chain",
                            True, counted=False)
                break
        # Judge each kill by the re-runs after it, up to the first that wrote something.
        final_ok, final_why, prec = self.compare_run(RunView(run), segments[-1]["output"])
        fin = segments[-1]
        if fin["rc"] != 0:
            final_ok, final_why = False, f"the last re-run failed ({fin['ended']})"
        for k, seg in enumerate(segments[:-1]):
            kill = seg["kill"]
            if kill.get("missed"):
                self.record("kills", f"chain {index}.{k + 1}", kill["target"], "-", kill["missed"], True,
                            counted=False)
                continue
            problems = []
            if kill["survivors"]:
                problems.append(f"processes alive after the kill: {kill['survivors']}")
            judged = []
            for nxt in segments[k + 1:]:
                judged.append(nxt)
                if nxt["rows"] or nxt["snapshots"] or nxt is fin:
                    break
            first = judged[0]
            if first["resumed"] is not None and first["resumed"] != kill["newest_complete"]:
                problems.append(f"resumed at step {first['resumed']}, the newest complete state was "
                                f"{kill['newest_complete']}")
            for seg2 in judged:
                problems += self.compare_rows(seg2["rows"], seg2["precision"])
                problems += self.compare_snapshots(seg2["snapshots"], seg2["precision"])
            if judged[-1] is fin and not final_ok:
                problems.append(final_why)
            exact = not problems
            resumed = first["resumed"]
            outcome = (f"re-run resumed at step {resumed}" if resumed is not None
                       else "re-run killed before it resumed")
            outcome += f", {sum(len(s['rows']) for s in judged)} steps and snapshots " \
                       f"{sorted(s for seg2 in judged for s in seg2['snapshots'])} compared"
            outcome += ": identical to the uninterrupted run" if exact else f": {'; '.join(problems)[:400]}"
            self.record("kills", f"chain {index}.{k + 1}", f"kill -9 at {kill['target']} ({kill['after_s']} s)",
                        kill["hit"], outcome, exact, counted=True, exact=exact, phase=kill["hit"].split(" (")[0],
                        latency_ms=kill.get("latency_ms"),
                        aimed="random" if kill.get("random") else "phase",
                        resumed=resumed, precision=seg["precision"], log=seg["log"])
        self.record("kills", f"chain {index} end", f"{len(chain) - len(leftover)} kills, then the command run to "
                    f"the end", f"{STEPS} steps", "losses of every step and every EMA snapshot identical to the "
                    "uninterrupted run" if final_ok else final_why, final_ok, counted=False, precision=prec)
        return leftover

    def part_kills(self) -> dict:
        self.baseline()
        plan = self.kill_plan()
        self.log(f"kills: {sum(len(c) for c in plan)} kills in {len(plan)} chains: "
                 + "; ".join(", ".join(s.get("phase", "random") + (f"@{s['step']}" if "step" in s else "")
                                       for s in c) for c in plan))
        queue = [(chain, False) for chain in plan]
        i = 0
        while queue:
            chain, retried = queue.pop(0)
            i += 1
            try:
                leftover = self.kill_chain(i, chain)
                if leftover and not retried:
                    queue.append((leftover, True))
            except Exception as e:  # noqa: BLE001 - a drill that broke is a failed trial, not a crash
                self.record("kills", f"chain {i}", str(chain), "-", f"drill error: {type(e).__name__}: {e}", False)
                traceback.print_exc()
        rows = [t for t in self.trials if t["part"] == "kills"]
        counted = [t for t in rows if t.get("counted")]
        phases = sorted({t["phase"] for t in counted if t["phase"] in PHASES}, key=PHASES.index)
        at_phase = [t for t in counted if t.get("aimed") == "phase"]
        what = (f"kill -9 of the whole job (the torchrun launcher's group and each rank's), {len(at_phase)} times "
                f"at a save phase and {len(counted) - len(at_phase)} at random, each followed by the same command; "
                f"ZeRO-2, 2 ranks x 2 data workers, precision auto; {i} chain(s) of kills run to the end")
        return {"what": what, "kills": len(counted), "phases hit": f"{len(phases)} of {len(PHASES)}" +
                (f" ({', '.join(phases)})" if phases else ""),
                "exact resumes": f"{sum(1 for t in counted if t.get('exact'))} of {len(counted)}",
                "ok": all(t["ok"] for t in rows)}

    # ---------------------------------------------------------------- part 2: storage outages

    def outage_trial(self, kind: str, seconds: float) -> None:
        """kind: stream (shards from gs://), upload (a state to gs://; a short outage loses the upload
        session), http (shards from `python -m http.server`)."""
        name = f"{kind}-{int(seconds)}s"
        server = (HTTPServer(self.shards, self.path("logs", f"http-{name}.log")) if kind == "http" else
                  GCSServer(self.path("gcs", name), self.path("logs", f"gcs-{name}.log")))
        job = None
        try:
            server.start()
            if kind != "http":
                fs = server.fs()
                fs.mkdir("bkt")
                env = {"STORAGE_EMULATOR_HOST": server.url}
                state_dir = self.path("outage", f"{name}-states")
            if kind == "http":
                run = self.path("outage", name)
                view = RunView(run)
                manifest = next(n for n in sorted(os.listdir(self.shards)) if n.endswith("manifest.json"))
                job = self.train(f"outage-{name}", run, shards=f"{server.url}/{manifest}")
                what = "while the trainer streams its shards from http:// (python -m http.server; after its first step)"
                fire = lambda: any(r.get("step", 0) >= 1 for r in view.rows())  # noqa: E731
            elif kind == "stream":
                fs.put(self.shards.rstrip("/") + "/", "bkt/digits/", recursive=True)
                run = self.path("outage", name)
                view = RunView(run)
                job = self.train(f"outage-{name}", run, shards="gs://bkt/digits", env=env)
                what = "while the trainer streams its shards from gs:// (after its first step)"
                fire = lambda: any(r.get("step", 0) >= 1 for r in view.rows())  # noqa: E731
            else:
                run = "gs://bkt/run"
                view = RunView("bkt/run", fs)
                job = self.train(f"outage-{name}", run, f"train.state_dir={state_dir}", env=env)
                target = os.path.join(state_dir, step_name(4), "trainer.json")  # written just before the upload
                what = "while the trainer uploads the state of step 4 (train.run_dir on gs://, state_dir local)"
                fire = lambda: os.path.exists(target)  # noqa: E731
            on_disk = RunView(run if kind != "upload" else server.object_path("bkt/run"))  # the server may be down

            def step_now() -> int:
                return max([r.get("step", 0) for r in on_disk.rows()] or [0])

            deadline = time.time() + 900
            while job.running() and not fire() and time.time() < deadline:
                time.sleep(0.002)
            if not job.running():
                raise RuntimeError(f"the run ended before the outage ({ended(job)})")
            server.stop()
            t_stop, step_stop = time.time(), step_now()
            uploaded = kind == "upload" and os.path.exists(server.object_path(f"bkt/run/states/{step_name(4)}/COMPLETE"))
            self.log(f"outage/{name}: server stopped at step {step_stop}" +
                     (f" (state 4 {'already' if uploaded else 'not yet'} marked in the bucket)" if kind == "upload"
                      else ""))
            while time.time() - t_stop < seconds:
                time.sleep(0.2)
            ended_during = not job.running()
            server.start()
            step_back = step_now()
            rc = job.wait(timeout=900)
            if rc is None:
                job.kill()
            out = job.output()
            stats = loader_stats(out)
            errors = stats.get("errors") if stats else None
            waited = "waiting for storage" in out
            if kind != "upload":
                hit = (f"outage from step {step_stop}; at step {step_back} when the server came back"
                       + ("; the trainer logged that it waited" if waited else ""))
                really = step_back < STEPS and not ended_during
            else:
                hit = (f"upload of step 4 {'already complete' if uploaded else 'in progress'}; "
                       f"at step {step_back} when the server came back")
                really = not uploaded and not ended_during
            ok_cmp, why, prec = self.compare_run(view, out)
            problems = []
            if rc != 0:
                problems.append(ended(job, out))
            if not ok_cmp:
                problems.append(why)
            if not really:
                problems.append("the outage did not meet the run (ended or passed the fault before it)")
            outcome = (f"waited and went on: exit 0, {errors} samples substituted, losses and snapshots identical"
                       if not problems else "; ".join(problems)[:500])
            tracebacks = out.count("Traceback (most recent call last)")
            if tracebacks:
                outcome += f" ({tracebacks} tracebacks in its output)"
            self.record("outage", name, f"{'HTTP' if kind == 'http' else 'GCS'} server stopped {seconds:.0f} s {what}",
                        hit, outcome, not problems,
                        substituted=errors, exact=ok_cmp, seconds=seconds, kind=kind, precision=prec,
                        tracebacks=tracebacks, waited_log=waited,
                        log=job.log_path)
        except Exception as e:  # noqa: BLE001
            self.record("outage", name, f"server stopped {seconds:.0f} s ({kind})", "-",
                        f"drill error: {type(e).__name__}: {e}", False, seconds=seconds, kind=kind)
            traceback.print_exc()
        finally:
            if job is not None:
                job.close()
            server.close()

    def part_outage(self) -> dict:
        self.baseline()
        durations = (10, 60) if self.quick else (10, 60, 300)
        for seconds in durations:
            # the streaming and the upload drill together: they mostly wait
            threads = [threading.Thread(target=self.outage_trial, args=(kind, seconds), daemon=True)
                       for kind in ("stream", "upload")]
            for t in threads:
                t.start()
                time.sleep(5)  # their start-ups apart, so that neither's precision probe meets the other
            for t in threads:
                t.join()
        # the upload cut short (a 3 s outage in the middle of a state's upload: the server forgets the
        # session) and an http(s) source that goes down, together
        threads = [threading.Thread(target=self.outage_trial, args=args, daemon=True)
                   for args in (("upload", 3), ("http", 20))]
        for t in threads:
            t.start()
            time.sleep(5)
        for t in threads:
            t.join()
        rows = [t for t in self.trials if t["part"] == "outage"]
        subs = [t.get("substituted") for t in rows]
        secs = ", ".join(f"{d} s" if d < 120 else f"{d // 60} min" for d in durations)
        what = (f"GCS API server (fake-gcs-server, filesystem backend) stopped for {secs} while the trainer streams "
                f"its shards from gs://, and for each while it uploads a state (train.run_dir on gs://); restarted "
                f"3 s into a state's upload (the upload session lost); an http:// shard server stopped for 20 s")
        identical = sum(1 for t in rows if t.get("exact"))
        return {"what": what, "exact resumes": f"{identical} of {len(rows)} runs identical",
                "samples substituted": sum(s for s in subs if isinstance(s, int)) if subs and
                all(isinstance(s, int) for s in subs) else "?", "ok": all(t["ok"] for t in rows)}

    # ---------------------------------------------------------------- part 3: two trainers

    def lease_trial(self, variant: str) -> None:
        run = self.path("lease", variant)
        shutil.rmtree(run, ignore_errors=True)
        view = RunView(run)
        long_run = ["train.total_steps=100000"]  # the first trainer trains until the suite ends it
        a = b = None
        ranks: list[int] = []  # the first trainer's ranks (orphans variant)
        workers: list[int] = []  # and their DataLoader workers
        trains = lambda job: bool(re.search(r"\[train\] step \d+/", job.output()))  # noqa: E731
        try:
            a = self.train(f"lease-{variant}-A", run, *long_run)
            if variant == "together":
                b = self.train(f"lease-{variant}-B", run, *long_run)
                fault = "two trainers started on one run at once (the same command twice)"
            else:
                deadline = time.time() + 600
                while a.running() and not view.rows() and time.time() < deadline:
                    a.note_tree()
                    time.sleep(0.1)
                if not a.running():
                    raise RuntimeError(f"the first trainer ended ({ended(a)})")
                if variant == "orphans":
                    ranks = a.ranks()
                    workers = [p for p in a.note_tree() if p not in ranks]
                    a.kill(launcher_only=True)
                    fault = ("kill -9 of the launcher's process group only (its ranks, in sessions of their own, "
                             "orphaned), then the same command at once")
                else:
                    fault = "the same command re-run while the first trainer trains"
                b = self.train(f"lease-{variant}-B", run, *long_run)
            t_b = time.time()
            first_alive = lambda: a.running() or any(alive(p, a.seen.get(p)) for p in ranks)  # noqa: E731
            ranks_gone = workers_gone = None
            both = False  # the second trainer trained while the first's ranks lived
            b_trained_at = None
            deadline = time.time() + 240
            while time.time() < deadline:
                a.note_tree()
                b.note_tree()
                if ranks and ranks_gone is None and not any(alive(p, a.seen.get(p)) for p in ranks):
                    ranks_gone = time.time() - t_b
                if workers and workers_gone is None and not any(alive(p, a.seen.get(p)) for p in workers):
                    workers_gone = time.time() - t_b
                a_tr = trains(a) if variant != "orphans" else any(alive(p, a.seen.get(p)) for p in ranks)
                b_tr = trains(b)
                if b_tr and b_trained_at is None:
                    b_trained_at = time.time()
                if a_tr and b_tr and first_alive():
                    both = True
                if not b.running() and (variant != "together" or not first_alive() or trains(a)):
                    break  # refused (or failed); the first goes on, or is gone
                if variant == "together" and not first_alive() and (trains(b) or not b.running()):
                    break
                if b_trained_at is not None and time.time() - b_trained_at > (10 if both else 5):
                    break  # the second trains: long enough to see whether the first still does
                time.sleep(0.5)
            a_alive = first_alive()
            b_rc, a_rc = b.poll(), a.poll()
            b_out, a_out = b.output(), a.output()
            for j in (a, b):
                if j.running():
                    j.kill()
            for pid in ranks + workers:
                if alive(pid, a.seen.get(pid)):
                    os.kill(pid, 9)
            kill_mentioning(run)
            rows = view.rows()
            steps = [r.get("step") for r in rows]
            twice = sorted({x for x in steps if steps.count(x) > 1})
            gaps = sorted(set(range(1, max(steps or [0]) + 1)) - set(steps))
            double = both or bool(twice)
            parts = []
            if variant == "orphans":
                parts.append(f"orphaned ranks gone {ranks_gone:.1f} s after the re-run started" if ranks_gone
                             is not None else "orphaned ranks still alive when the drill ended")
                if workers:
                    parts.append(f"their data workers gone after {workers_gone:.1f} s" if workers_gone is not None
                                 else "their data workers still alive when the drill ended")
            for name, rc, out, job in (("second", b_rc, b_out, b), ("first", a_rc, a_out, a)):
                if name == "first" and variant == "orphans":
                    continue
                if rc is None:
                    parts.append(f"{name} trainer {'training' if trains(job) else 'starting'} when the drill "
                                 f"ended")
                else:
                    parts.append(f"{name} trainer ended: {ended(job, out)}")
            parts.append(f"steps written twice: {len(twice)}" + (f" ({twice[:6]}{' ...' if len(twice) > 6 else ''})"
                                                                 if twice else ""))
            if gaps:
                parts.append(f"steps missing from the log: {len(gaps)} ({gaps[:6]}{' ...' if len(gaps) > 6 else ''})")
            hit = ("both trainers trained at once" if both else
                   "the first trainer's ranks were alive when the second started" if variant != "together"
                   else "both started together")
            ok = not double and not gaps and (variant != "orphans" or ranks_gone is not None)
            self.record("lease", variant, fault, hit, "; ".join(parts), ok, double_writer=double,
                        steps_twice=len(twice), steps_missing=len(gaps), first_alive_at_end=a_alive,
                        ranks_gone_s=ranks_gone, log=b.log_path)
        except Exception as e:  # noqa: BLE001
            self.record("lease", variant, variant, "-", f"drill error: {type(e).__name__}: {e}", False)
            traceback.print_exc()
        finally:
            for j in (a, b):
                if j is not None:
                    j.close()
            for pid in ranks + workers:
                if a is not None and alive(pid, a.seen.get(pid)):
                    os.kill(pid, 9)

    def part_lease(self) -> dict:
        for variant in (("rerun",) if self.quick else ("rerun", "orphans", "together")):
            self.lease_trial(variant)
        rows = [t for t in self.trials if t["part"] == "lease"]
        names = {"rerun": "the same command re-run while the first trains",
                 "orphans": "the first's launcher alone killed (ranks orphaned) and the command re-run at once",
                 "together": "two started at once"}
        what = "two trainers on one run: " + "; ".join(names[t["trial"]] for t in rows if t["trial"] in names)
        return {"what": what, "double writers": f"{sum(1 for t in rows if t.get('double_writer'))} of {len(rows)}",
                "ok": all(t["ok"] for t in rows)}

    # ---------------------------------------------------------------- part 4: the eval service

    def ledger_rows(self, run: str) -> list[dict]:
        return _jsonl(os.path.join(run, "eval", "ledger.jsonl"))

    def scored(self, run: str) -> set[int]:
        """Snapshots with an ok FID/FVD row in the ledger."""
        return {r.get("step") for r in self.ledger_rows(run)
                if r.get("status") == "ok" and r.get("metric") in ("fid", "fvd")}

    def part_eval(self) -> dict:
        base = self.baseline()
        run = self.path("eval", "run")
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base.run, run, ignore=shutil.ignore_patterns("eval", "states"))
        overrides = EVAL_OVERRIDES + [f"eval.cache_dir={self.path('eval', 'cache')}"]
        snaps = RunView(run).steps("snapshots")
        kills = 1 if self.quick else 2
        fired = 0
        pending_checks = []  # per killed snapshot: when the next service started, how long it took
        for k in range(kills + 1):
            svc = self.job(f"eval-{k}", ["-m", "evals.service", "--run", run, "--once", "--quiet", *overrides])
            for chk in pending_checks:
                if chk["next_started"] is None:
                    chk["next_started"] = svc.started
            last = k == kills
            scored = self.scored(run)
            # the snapshot to kill it on: past those left by earlier kills, which it must score first
            todo = [s for s in snaps if s not in scored and s not in {c["step"] for c in pending_checks}]
            target = todo[0] if todo else None
            hit = None
            deadline = time.time() + 600
            while svc.running() and time.time() < deadline:
                for chk in pending_checks:
                    if chk["latency"] is None and chk["step"] in self.scored(run):
                        chk["latency"] = time.time() - chk["next_started"]
                if not last and target is not None and f"step {target}: sampling" in svc.output():
                    fired += 1
                    time.sleep(self.rng.uniform(0.0, 2.0))  # somewhere in the sampling and scoring
                    claim = os.path.exists(os.path.join(run, "eval", "claims", f"{step_name(target)}.json"))
                    survivors = svc.kill()
                    done = target in self.scored(run)
                    hit = (f"step {target} {'already scored' if done else 'being scored'}, claim file "
                           f"{'held' if claim else 'absent'}" + (f", survivors {survivors}" if survivors else ""))
                    self.log(f"eval: service {k} killed mid-score: {hit}")
                    if not done:
                        pending_checks.append({"step": target, "killed": time.time(), "next_started": None,
                                               "latency": None, "hit": hit, "k": k, "survivors": survivors})
                    else:
                        self.record("eval", f"kill {k + 1}", f"kill -9 of the service scoring step {target}", hit,
                                    "the kill came after the row was written: not counted", True, counted=False)
                    break
                time.sleep(0.05)
            if svc.running():
                svc.kill()
                self.log(f"eval: service {k} ran over 10 minutes: killed")
            out = svc.output()
            svc.close()
            for chk in pending_checks:  # rows written in the last poll interval
                if chk["latency"] is None and chk["next_started"] is not None and chk["step"] in self.scored(run):
                    chk["latency"] = svc.ended - chk["next_started"] if svc.ended else None
            if last and svc.proc.returncode != 0:
                self.log(f"eval: the last service ended: {ended(svc, out)}")
        rows = self.ledger_rows(run)
        ok_steps = self.scored(run)
        never = [s for s in snaps if s not in ok_steps]
        late = []
        for i, chk in enumerate(pending_checks, 1):
            lat = chk["latency"]
            good = lat is not None and lat <= EVAL_DEADLINE_S and not chk["survivors"]
            if not good:
                late.append(chk["step"])
            outcome = (f"scored by the next service {lat:.0f} s after it started" if lat is not None
                       else "not scored by the next service")
            self.record("eval", f"kill {chk['k'] + 1}", f"kill -9 of the eval service while it scores step "
                        f"{chk['step']}", chk["hit"], outcome, good, counted=True, latency=lat)
        twice = sorted({r["step"] for r in rows if r.get("status") == "ok" and r.get("metric") in ("fid", "fvd")
                        and sum(1 for x in rows if x["step"] == r["step"] and x.get("status") == "ok"
                                and x.get("metric") == r.get("metric")) > 1})
        self.record("eval", "end", f"{fired} kills, then a service run to the end", f"snapshots {snaps}",
                    f"scored: {sorted(ok_steps)}; never scored: {never}"
                    + (f"; scored twice: {twice}" if twice else ""),
                    not never, counted=False)
        unscored = len(set(never) | set(late))
        what = (f"the eval service (--once) killed {len(pending_checks)} time(s) while it scores a snapshot; the "
                f"next service must score that snapshot within {EVAL_DEADLINE_S:.0f} s of its start")
        return {"what": what, "kills": len(pending_checks), "unscored snapshots": unscored,
                "ok": unscored == 0 and all(t["ok"] for t in self.trials if t["part"] == "eval")}

    # ---------------------------------------------------------------- part 5: hangs (bench/_faults_hangs.py)

    def part_hangs(self) -> dict:
        import _faults_hangs

        return _faults_hangs.part(self)

    # ---------------------------------------------------------------- part: state

    def part_state(self) -> dict:
        base = self.baseline()
        one_state = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(
            os.path.join(base.run, "states", step_name(STEPS))) for f in fs)
        full = self.state_disk_full(one_state)
        damaged = self.state_damaged()
        what = ("a full disk at a save (train.state_dir on a real tmpfs that holds one state, not two; then "
                "enlarged and the same command re-run), and a file of the newest complete state truncated "
                "before the same command is re-run")
        return {"what": what, "exact resumes": f"{int(full) + int(damaged)}/2", "ok": full and damaged}

    def state_disk_full(self, one_state: int) -> bool:
        """train.state_dir on a tmpfs of 1.6 states: the second save cannot fit."""
        disk, run = self.path("state", "disk"), self.path("state", "full-run")
        shutil.rmtree(run, ignore_errors=True)
        os.makedirs(disk, exist_ok=True)
        size = f"{int(one_state * 1.6) // 1024}k"
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk], capture_output=True,
                             text=True)
        if out.returncode != 0:
            self.record("state", "disk full", "a full disk", "-", f"cannot mount a tmpfs: {out.stderr.strip()}", False)
            return False
        try:
            job = self.train("state-full", run, f"train.state_dir={disk}")
            job.wait(900)
            said = job.output()
            job.close()
            line = last_line(said)
            left = sorted(n for n in os.listdir(disk) if re.search(r"step-\d{9}$", n))
            kept = [n for n in left if os.path.exists(os.path.join(disk, n, "COMPLETE"))]
            clean = left == kept and len(kept) == 1
            one_line = "no space left on the device" in line and disk in line and "basic_ios" not in said
            stopped = max((r["step"] for r in RunView(run).rows()), default=0)
            self.record("state", "disk full", f"train.state_dir on a {size}B tmpfs (a state is "
                        f"{one_state / 2**20:.1f} MiB)", f"stopped at step {stopped}",
                        f"{line or ended(job, said)}; left: {left}", job.proc.returncode != 0 and one_line and clean)
            # room for train.keep_last (3) states and the one being written
            subprocess.run(["mount", "-o", f"remount,size={int(one_state * 5.5) // 1024}k", disk], check=True)
            job = self.train("state-full-resume", run, f"train.state_dir={disk}")
            job.wait(900)
            said = job.output()
            job.close()
            same, why, _ = self.compare_run(RunView(run), said)
            ok = job.proc.returncode == 0 and same
            self.record("state", "disk freed", "the same command after the disk was enlarged",
                        f"resumed at {resumed_at(said, True)}", "exact" if ok else (why or ended(job, said)), ok)
            return one_line and clean and ok
        finally:
            subprocess.run(["umount", disk], capture_output=True)

    def state_damaged(self) -> bool:
        """A run to step 8, a file of its newest state truncated, then the same command to the end."""
        run = self.path("state", "damaged-run")
        shutil.rmtree(run, ignore_errors=True)
        job = self.train("state-damaged", run, "train.total_steps=8")
        job.wait(900)
        job.close()
        newest = os.path.join(run, "states", step_name(8))
        files = sorted(os.path.relpath(os.path.join(d, f), newest) for d, _, fs in os.walk(newest) for f in fs
                       if f != "COMPLETE")
        victim = os.path.join(newest, self.rng.choice(files))
        os.truncate(victim, os.path.getsize(victim) // 2)
        job = self.train("state-damaged-resume", run)
        job.wait(900)
        said = job.output()
        job.close()
        named = any("is damaged" in ln and victim in ln for ln in said.splitlines())
        same, why, _ = self.compare_run(RunView(run), said)
        at = resumed_at(said, True)
        ok = job.proc.returncode == 0 and named and same and at == 6
        self.record("state", "damaged state", f"{os.path.relpath(victim, run)} truncated to half (COMPLETE kept)",
                    f"resumed at {at}", ("the damaged file named in one line; exact" if named and same else
                                         why or ended(job, said)), ok)
        return ok

    # ---------------------------------------------------------------- all

    def run(self, parts: list[str], after_part=None) -> None:
        self.make_shards()
        for part in parts:
            t = time.time()
            self.log(f"--- {part}")
            try:
                self.summary[part] = getattr(self, f"part_{part}")()
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                self.record(part, "setup", part, "-", f"drill error: {type(e).__name__}: {e}", False)
                self.summary[part] = {"ok": False}
            self.summary[part]["seconds"] = round(time.time() - t)
            if after_part is not None:
                after_part()


def _jsonl(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except OSError:
        pass
    return out


# --------------------------------------------------------------------------------------------
# The tables

COLUMNS = ["kills", "phases hit", "exact resumes", "samples substituted", "double writers", "unscored snapshots"]


def markdown(suite: Suite, seconds: float) -> str:
    at = f"commit {suite.commit[:10]}" if suite.commit else "no git commit"
    if suite.changed:
        at += f" + uncommitted changes to {len(suite.changed)} file(s)"
    cmd = f"python bench/faults.py{' --quick' if suite.quick else ''}"
    lines = [f"Fault drills (`{cmd}`, seed {suite.seed}, {at}): "
             f"{sum(1 for t in suite.trials if t['ok'])} of {len(suite.trials)} checks passed in "
             f"{seconds / 60:.1f} minutes.", "",
             "| part | what was done | " + " | ".join(COLUMNS) + " | result |",
             "|---|---|" + "---|" * len(COLUMNS) + "---|"]
    for part, s in suite.summary.items():
        what = s.get("what", part)
        cells = [str(s.get(c, "-")) for c in COLUMNS]
        lines.append(f"| {part} | {what} | " + " | ".join(cells) + f" | {'pass' if s.get('ok') else '**FAIL**'} |")
    lines += ["", "| part | trial | fault | hit | outcome | ok |", "|---|---|---|---|---|---|"]
    for t in suite.trials:
        cells = [t["part"], t["trial"], t["fault"], t["hit"], t["outcome"], "yes" if t["ok"] else "**no**"]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/faults.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default: all): {', '.join(PARTS)}")
    p.add_argument("--quick", action="store_true", help="a reduced set: 3 kills, 10 s and 60 s outages, one "
                   "double-trainer drill, one eval kill (about 10 minutes on 2 cores)")
    p.add_argument("--json", default="", help="also write the tables as JSON to this file")
    p.add_argument("--seed", type=int, default=None, help="seed for phases, kill times (default: random, printed)")
    p.add_argument("--workdir", default="", help="where runs, servers' roots and logs go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder even when every drill passed")
    p.add_argument("--repo", default=ROOT, help="the rin_scale checkout to drill (default: this one)")
    p.add_argument("--ref", default="", help="drill a clean copy of this commit of --repo (git archive), e.g. HEAD, "
                   "instead of its working tree (which others may be editing while the drills run)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        p.error(f"--only: unknown part(s) {bad}; choose from {', '.join(PARTS)}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(10**6)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops what was started
    suite = Suite(args)
    suite.log(f"work folder {suite.work}; seed {suite.seed}; parts {', '.join(parts)}"
              + (" (quick)" if args.quick else ""))
    t0 = time.time()

    def write_json(done: bool = False) -> None:  # after every part too: a long run killed midway keeps its results
        if not args.json:
            return
        seconds = time.time() - t0
        ok = done and bool(suite.summary) and all(s.get("ok") for s in suite.summary.values())
        with open(args.json + ".tmp", "w") as f:
            json.dump({"quick": args.quick, "seed": suite.seed, "seconds": round(seconds), "repo": suite.repo,
                       "commit": suite.commit, "uncommitted_changes": suite.changed, "parts": parts,
                       "finished": done, "ok": ok, "summary": suite.summary, "trials": suite.trials,
                       "work": suite.work, "markdown": markdown(suite, seconds)}, f, indent=1)
        os.replace(args.json + ".tmp", args.json)

    finished = False
    try:
        suite.run(parts, after_part=write_json)
        finished = True
    except KeyboardInterrupt:
        suite.log("interrupted")
    finally:
        stop_everything()
    seconds = time.time() - t0
    table = markdown(suite, seconds)
    print(table)
    ok = finished and bool(suite.summary) and all(s.get("ok") for s in suite.summary.values())
    write_json(done=finished)
    if ok and not args.keep:
        shutil.rmtree(suite.work, ignore_errors=True)
    else:
        print(f"\nwork folder (runs and logs): {suite.work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
