"""The eval service: scores every new snapshot of a run with FID (images) or FVD (video).

    python -m evals.service --run RUN [--once] [section.key=value ...]      (or: rin-eval ...)

Polls RUN/snapshots/ for complete snapshots the ledger does not hold yet, loads the EMA weights
(no DeepSpeed), samples eval.num_samples with the configured sampler, scores them against the real
data's reference statistics, appends a row to RUN/eval/ledger.jsonl and writes TensorBoard scalars
and a sample grid under RUN/eval/tb. A class-conditional model with eval.classifier_data set also
gets a `class_accuracy` row. Claims (RUN/eval/claims/step-N.json, created exclusively) keep two
services on one run from scoring the same snapshot; an unrefreshed claim older than
eval.claim_timeout is taken over. Snapshots deleted by retention, incomplete or corrupt ones leave
a ledger row or a log line, never a crash.
"""
from __future__ import annotations

import os


import argparse
import contextlib
import json
import shutil
import socket
import sys
import tempfile
import time
import traceback
import uuid

import torch
from tqdm import tqdm

from rin_scale import rundir, storage
from rin_scale.config import ConfigError
from rin_scale.rundir import load_run_config

MAX_FAILURES = 3  # unexpected errors on one snapshot before it gets an error row and is left alone


def log(msg: str) -> None:
    print(f"[evals {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Service:
    def __init__(self, run: str, overrides=(), device=None, progress: bool = True):
        from .extractors import metric_for

        self.run = run.rstrip("/")
        self.cfg = load_run_config(self.run, overrides)
        self.metric = metric_for(self.cfg)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = progress
        self.ledger = storage.join(self.run, "eval", "ledger.jsonl")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.failures: dict[int, int] = {}
        self.reported_incomplete: set[int] = set()
        self._extractor = self._reference = self._frechet = self._writer = None
        self._tb_local = None
        e = self.cfg.eval
        if e.order == "milestones" and not self.cfg.train.milestone_every:
            raise ConfigError("eval.order=milestones needs train.milestone_every > 0 in the run's config")

    # ---------------------------------------------------------------- what to score

    def scored_steps(self) -> set[int]:
        return {int(r["step"]) for r in storage.read_jsonl(self.ledger) if r.get("metric") == self.metric}

    def pending(self) -> list[tuple[int, str]]:
        """Complete snapshots without a ledger row, in eval.order."""
        done = self.scored_steps()
        found = [(s, u) for s, u in rundir.list_complete(self.run, "snapshots") if s not in done]
        self._report_incomplete({s for s, _ in found} | done)
        e = self.cfg.eval
        if e.order == "milestones":
            found = [(s, u) for s, u in found if s % self.cfg.train.milestone_every == 0]
        return found[::-1] if e.order == "newest" else found

    def _report_incomplete(self, known: set[int]) -> None:
        fs, root = storage.fs_path(storage.join(self.run, "snapshots"))
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return
        for entry in entries:
            m = rundir.STEP_RE.search(entry.rstrip("/"))
            if m and int(m.group(1)) not in known and int(m.group(1)) not in self.reported_incomplete:
                self.reported_incomplete.add(int(m.group(1)))
                log(f"{entry.rstrip('/').rsplit('/', 1)[-1]} has no COMPLETE marker (being written, or "
                    f"abandoned): skipped until it has one")

    # ---------------------------------------------------------------- claims

    def _claim_url(self, step: int) -> str:
        return storage.join(self.run, "eval", "claims", f"{rundir.step_name(step)}.json")

    def _create_exclusive(self, url: str, body: bytes) -> bool:
        fs, path = storage.fs_path(url)
        if storage.is_local(url):
            path = storage.local_path(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        try:
            # gcsfs sends ifGenerationMatch=0, s3fs If-None-Match: the store refuses a second create.
            # (open(path, "xb") is not exclusive in gcsfs for small files: it was seen overwriting.)
            fs.pipe_file(path, body, mode="create")
            return True
        except FileExistsError:
            return False
        except TypeError:  # a store without exclusive create: check, then write (a small race window)
            if fs.exists(path):
                return False
            fs.pipe_file(path, body)
            return True
        except Exception as e:  # some stores report the failed precondition as a generic error
            if "412" in str(e) or "Precondition" in str(e) or "exists" in str(e).lower():
                return False
            raise

    def claim(self, step: int) -> bool:
        """True when this service now owns the snapshot; stale claims of dead services are taken over."""
        url = self._claim_url(step)
        body = json.dumps({"owner": self.owner, "time": time.time()}).encode()
        if self._create_exclusive(url, body):
            return True
        try:
            other = storage.read_json(url)
        except (FileNotFoundError, ValueError):
            other = {"time": 0}  # released meanwhile, or torn: try once more
        age = time.time() - float(other.get("time", 0))
        if age < self.cfg.eval.claim_timeout:
            log(f"step {step}: claimed by {other.get('owner')} {age:.0f} s ago; left to it")
            return False
        log(f"step {step}: taking over a stale claim ({age:.0f} s old) of {other.get('owner')}")
        self.release(step)
        return self._create_exclusive(url, body)

    def refresh_claim(self, step: int) -> None:
        storage.write_json(self._claim_url(step), {"owner": self.owner, "time": time.time()})

    def release(self, step: int) -> None:
        fs, path = storage.fs_path(self._claim_url(step))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)

    # ---------------------------------------------------------------- scoring

    @property
    def extractor(self):
        if self._extractor is None:
            from .extractors import Extractor

            self._extractor = Extractor(self.metric, self.cfg.eval, self.device)
        return self._extractor

    @property
    def reference(self):
        if self._reference is None:
            from .reference import reference_stats

            self._reference = reference_stats(self.cfg, self.extractor, self.progress)
        return self._reference

    def run_once(self, pending=None, limit: int = 0) -> int:
        """Score what is pending (or the given [(step, url)]), at most `limit` snapshots (0 = all);
        returns how many ledger rows were written."""
        rows = 0
        todo = self.pending() if pending is None else pending
        todo = todo[:limit] if limit else todo
        if todo:
            self.reference  # a missing extractor or real data is the service's error, not a snapshot's
        for step, url in todo:
            try:
                rows += self.score(step, url)
            except KeyboardInterrupt:
                self.release(step)
                raise
            except Exception as e:
                self.release(step)
                n = self.failures[step] = self.failures.get(step, 0) + 1
                log(f"step {step}: scoring failed ({type(e).__name__}: {e}); attempt {n} of {MAX_FAILURES}")
                if os.environ.get("RIN_EVAL_DEBUG"):
                    traceback.print_exc()
                if n >= MAX_FAILURES:
                    self._append({"step": step, "metric": self.metric, "value": None, "status": "error",
                                  "error": f"{type(e).__name__}: {e}"[:500]})
                    rows += 1
        return rows

    def score(self, step: int, url: str) -> int:
        from rin_scale.rundir import SnapshotError, load_snapshot_model

        if not self.claim(step):
            return 0
        try:
            if step in self.scored_steps():  # another service finished it between listing and claiming
                return 0
            t0 = time.time()
            try:
                model, dcfg, meta = load_snapshot_model(url, self.device)
            except SnapshotError as e:
                fs, path = storage.fs_path(url)
                status = "corrupt" if fs.exists(storage.join(path, rundir.COMPLETE)) else "deleted"
                log(f"step {step}: not scored, {status}: {e}")
                self._append({"step": step, "metric": self.metric, "value": None, "status": status,
                              "error": str(e)[:500]})
                return 1
            log(f"step {step}: sampling {self.cfg.eval.num_samples} with {self._sampler(dcfg)} "
                f"({self._steps(dcfg)} steps) on {self.device}")
            result = self._evaluate(step, model, dcfg)
            seconds = time.time() - t0
            base = {"step": step, "images_seen": meta.get("images_seen"), "samples": result["samples"],
                    "sampler": self._sampler(dcfg), "steps": self._steps(dcfg), "guidance": dcfg.guidance,
                    "seconds": round(seconds, 2), "status": "ok", "time": time.time()}
            out = [{**base, "metric": self.metric, "value": result["value"], "extractor": self.extractor.id,
                    "reference": self.reference[3], "reference_samples": self.reference[2]}]
            if "class_accuracy" in result:
                out.append({**base, "metric": "class_accuracy", "value": result["class_accuracy"],
                            "classifier": "sklearn SVC(C=10) on pixels",
                            "classifier_real_accuracy": result["classifier_real_accuracy"],
                            "classifier_data": self.cfg.eval.classifier_data})
            for row in out[1:] + out[:1]:  # the primary row last: it is what marks the step done
                self._append(row)
            self._tensorboard(step, result, out)
            extra = (f", class accuracy {result['class_accuracy']:.3f} (classifier on real held-out data: "
                     f"{result['classifier_real_accuracy']:.3f})" if "class_accuracy" in result else "")
            log(f"step {step}: {self.metric.upper()} {result['value']:.4f} from {result['samples']} samples "
                f"in {seconds:.0f} s{extra}")
            return len(out)
        finally:
            self.release(step)

    def _sampler(self, dcfg) -> str:
        return self.cfg.eval.sampler or dcfg.sampler

    def _steps(self, dcfg) -> int:
        return self.cfg.eval.steps or dcfg.sample_steps

    def _evaluate(self, step: int, model, dcfg) -> dict:
        from rin_scale.diffusion import sample

        from .classifier import balanced_labels, get_classifier
        from .frechet import FrechetReference

        e, m = self.cfg.eval, model.cfg
        if self._frechet is None:
            self._frechet = FrechetReference(self.reference[0], self.reference[1], rows=self.reference[4])
        stats = self.extractor.new_stats()
        classifier = None
        if e.classifier_data and m.num_classes > 0 and not m.is_video:
            classifier = get_classifier(e.classifier_data, self.cfg.model)
        labels = balanced_labels(e.num_samples, m.num_classes) if m.num_classes > 0 else None
        conds = self._cond_clips() if m.is_video else None
        gen = torch.Generator(self.device).manual_seed(self.cfg.train.seed)  # same noise for every snapshot
        correct, grid, last_refresh = 0, [], time.time()
        bar = tqdm(total=e.num_samples, desc=f"step {step}", unit="sample", disable=not self.progress,
                   file=sys.stderr)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    and torch.cuda.is_bf16_supported() else contextlib.nullcontext())
        for start in range(0, e.num_samples, e.batch):
            b = min(e.batch, e.num_samples - start)
            lb = labels[start:start + b].to(self.device) if labels is not None else None
            cond = torch.stack([next(conds) for _ in range(b)]).to(self.device) if conds is not None else None
            with torch.no_grad(), autocast:
                x = sample(model, (b, *m.sample_shape), dcfg, labels=lb, cond=cond, steps=self._steps(dcfg),
                           sampler=self._sampler(dcfg), generator=gen)
            x = x.float().clamp(-1, 1)
            if cond is not None:  # FVD scores the whole clip: given frames, then predicted ones
                x = torch.cat([cond.float(), x], dim=2)
            stats.update(x)
            if classifier is not None:
                correct += int((classifier.predict(x) == lb.cpu().numpy()).sum())
            if sum(len(g) for g in grid) < 64:
                grid.append(x[: 64 - sum(len(g) for g in grid)].cpu())
            bar.update(b)
            if time.time() - last_refresh > e.claim_timeout / 4:  # long evals keep their claim alive
                self.refresh_claim(step)
                last_refresh = time.time()
        bar.close()
        mu, sigma = stats.mean_cov()
        out = {"value": self._frechet.distance(mu, sigma, stats.rows()), "samples": stats.n,
               "grid": torch.cat(grid)}
        if classifier is not None:
            out["class_accuracy"] = correct / e.num_samples
            out["classifier_real_accuracy"] = classifier.real_accuracy
        return out

    def _cond_clips(self):
        """Real clips' leading frames, cycled: the frames video samples are conditioned on."""
        from rin_scale.data import iter_samples

        if not self.cfg.data.shards:
            raise ConfigError("video evaluation needs data.shards (real clips give the conditioning frames)")
        tc = self.cfg.model.cond_frames
        while True:
            n = 0
            for x, _, _ in iter_samples(self.cfg.data.shards, self.cfg.model):
                n += 1
                yield x[:, :tc]
            if n == 0:
                raise ValueError(f"data.shards={self.cfg.data.shards!r} gave no readable clips")

    # ---------------------------------------------------------------- outputs

    def _append(self, row: dict) -> None:
        storage.append_jsonl(self.ledger, row)

    def _tensorboard(self, step: int, result: dict, rows: list[dict]) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torchvision.utils import make_grid

        tb_url = storage.join(self.run, "eval", "tb")
        if self._writer is None:
            # Torch's writer cannot append to object stores (TESTING.md): write locally, then copy.
            self._tb_local = (storage.local_path(tb_url) if storage.is_local(tb_url)
                              else tempfile.mkdtemp(prefix="rin-eval-tb-"))
            self._writer = SummaryWriter(self._tb_local)
        w = self._writer
        for row in rows:
            w.add_scalar(f"eval/{row['metric']}", row["value"], step)
        if "classifier_real_accuracy" in result:
            w.add_scalar("eval/classifier_real_accuracy", result["classifier_real_accuracy"], step)
        g = (result["grid"] + 1) / 2
        if g.dim() == 5:  # video: one row per clip, frames left to right
            nrow = g.shape[2]
            g = g.permute(0, 2, 1, 3, 4).reshape(-1, *g.shape[1:2], *g.shape[3:])[: 16 * nrow]
        else:
            nrow = max(1, int(len(g) ** 0.5))
        w.add_image("eval/samples", make_grid(g, nrow=nrow, padding=1).clamp(0, 1), step)
        w.flush()
        if not storage.is_local(tb_url):
            fs, root = storage.fs_path(tb_url)
            for name in os.listdir(self._tb_local):
                fs.put_file(os.path.join(self._tb_local, name), f"{root}/{name}")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if not storage.is_local(self.run) and self._tb_local:
                shutil.rmtree(self._tb_local, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.service", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory: a local path or fsspec URL (gs://bucket/runs/NAME)")
    p.add_argument("--once", action="store_true", help="score what is there now and exit")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    p.add_argument("--limit", type=int, default=0,
                   help="score at most N snapshots per pass (with --once and eval.order=newest: the newest N)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. eval.num_samples=5000 eval.order=newest")
    args = p.parse_args(argv)
    from rin_scale.data import DataError

    from .extractors import ExtractorError

    svc = None
    try:
        while svc is None:
            try:
                svc = Service(args.run, args.overrides, args.device, progress=not args.quiet)
            except FileNotFoundError as e:
                if args.once:
                    raise
                log(f"{e}; waiting")
                time.sleep(30)
        log(f"watching {args.run}: {svc.metric.upper()}, {svc.cfg.eval.num_samples} samples per snapshot, "
            f"order={svc.cfg.eval.order}, device={svc.device}")
        while True:
            n = svc.run_once(limit=args.limit)
            if args.once:
                log(f"done: {n} ledger row(s) written to {svc.ledger}")
                return 0
            time.sleep(svc.cfg.eval.poll_seconds)
    except (ConfigError, ExtractorError, DataError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        if svc is not None:
            svc.close()


if __name__ == "__main__":
    sys.exit(main())
