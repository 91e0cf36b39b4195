"""The eval service: scores every new snapshot of a run with FID (images) or FVD (video).

    python -m evals.service --run RUN [--once] [section.key=value ...]      (or: rin-eval ...)

Polls RUN/snapshots/ for complete snapshots the ledger does not hold yet, loads the EMA weights
(no DeepSpeed), samples eval.num_samples with the configured sampler, scores them against the real
data's reference statistics, adds a row to the ledger (evals.ledger) and writes TensorBoard scalars
and a sample grid under RUN/eval/tb. A class-conditional model with eval.classifier_data set also
gets a `class_accuracy` row and the digit-domain rows of evals.digits_cnn: `domain_fid` (features of
a small CNN trained on the real training data, with the real held-out data's own distance as its
`floor`) and `laplacian_ratio` (mean |Laplacian| of the samples / of the real held-out images). A
video model with eval.classifier_data (labelled held-out clips) is conditioned on those clips' given
frames and also gets the rows of evals.video_metrics: `frame_mse` (per predicted frame, beside the
repeat-last-frame and data-mean baselines) and `frame_accuracy` (the digit recognised). Claims (RUN/eval/claims/step-N.json, created exclusively) keep two
services on one run from scoring the same snapshot; the holder renews its claim's heartbeat while
scoring, and a claim is taken over when its heartbeat stops (a few periods, at most
eval.claim_timeout) or, on the same host, when its process is gone. Snapshots deleted by
retention, incomplete or corrupt ones, and non-finite samples or features leave a ledger row or a
log line, never a crash or a score.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import socket
import sys
import threading
import time
import traceback
import uuid

import torch
from tqdm import tqdm

from rin_scale import rundir, storage
from rin_scale.config import ConfigError, scored_clips
from rin_scale.media import to_uint8
from rin_scale.rundir import load_run_config
from rin_scale.sample import chunk_plan

from . import ledger
from .frechet import FeatureStats

MAX_FAILURES = 3  # unexpected errors on one snapshot before it gets an error row and is left alone
HEARTBEAT = 30.0  # seconds between renewals of a claim while its snapshot is scored
STALE_BEATS = 4  # missed heartbeats after which a claim's holder counts as dead


def log(msg: str) -> None:
    print(f"[evals {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:500]


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):  # another user's process, or no pid recorded
        return True
    return True


def check_finite_weights(model) -> None:
    """NaN or inf in the weights: found when they are loaded, not after a whole sampling pass."""
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"non-finite weights (NaN or inf) in {len(bad)} tensor(s) of ema.safetensors, "
                                 f"e.g. {bad[0]}: the snapshot's weights are broken")


def samples_url(run: str, step: int, start: int) -> str:
    """A scored chunk's uint8 samples (eval.keep_samples): an .npz named by its first sample index."""
    return storage.join(run, "eval", "samples", rundir.step_name(step), f"samples-{start:09d}.npz")


def _to_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


class Service:
    def __init__(self, run: str, overrides=(), device=None, progress: bool = True):
        from .extractors import metric_for

        self.run = run.rstrip("/")
        self.cfg = load_run_config(self.run, overrides)
        self.clip_cfg = scored_clips(self.cfg)
        self.metric = metric_for(self.cfg)
        # One task per GPU in a multi-GPU eval job (launch.submit --service eval --gpus-per-node G):
        # each takes its own GPU by LOCAL_RANK, as the trainer's ranks do.
        gpu = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        self.device = torch.device(device or (gpu if torch.cuda.is_available() else "cpu"))
        self.progress = progress
        self.host = socket.gethostname()
        self.owner = f"{self.host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.stale_after = min(self.cfg.eval.claim_timeout, STALE_BEATS * HEARTBEAT)
        self.failures: dict[int, int] = {}
        self.failed: list[str] = []  # the last pass's failures, one line each
        self.reported_incomplete: set[int] = set()
        self._ledger_cache: dict = {}
        self._key = ""  # the chunk key of the snapshot being scored (_chunk_key)
        self._frechet = self._tb = None
        e = self.cfg.eval
        if e.order == "milestones" and not self.cfg.train.milestone_every:
            raise ConfigError("eval.order=milestones needs train.milestone_every > 0 in the run's config")
        # The plan the trainer's retention follows (rundir.prune_snapshots): which snapshots to keep.
        storage.write_json(storage.join(self.run, "eval", "plan.json"),
                           {"order": e.order, "metric": self.metric, "owner": self.owner, "time": time.time()})

    # ---------------------------------------------------------------- what to score

    def scored_steps(self) -> set[int]:
        return {int(r["step"]) for r in ledger.read(self.run, self._ledger_cache) if r.get("metric") == self.metric}

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

    def _claim_url(self, step: int, part: str = "") -> str:
        """step-N.json: the right to write step N's rows; step-N-chunk-K.json: to score chunk K."""
        return storage.join(self.run, "eval", "claims", f"{rundir.step_name(step)}{part}.json")

    def _claim_body(self) -> bytes:
        return json.dumps({"owner": self.owner, "host": self.host, "pid": os.getpid(), "time": time.time()}).encode()

    def _create_exclusive(self, url: str, body: bytes) -> bool:
        if storage.is_local(url):
            path = storage.local_path(url)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            # Written whole beside its name, then linked: a reader never sees the claim empty (an
            # O_EXCL create is visible before its body is written, and was taken for a torn claim).
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
            with open(tmp, "wb") as f:
                f.write(body)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: exclusive create, then the body
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(body)
            finally:
                os.unlink(tmp)
            return True
        fs, path = storage.fs_path(url)
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

    def _stale(self, claim: dict) -> str:
        """Why a claim's holder is gone, or "" while it may be alive."""
        age = time.time() - float(claim.get("time", 0))
        if age > self.stale_after:
            return f"no heartbeat for {age:.0f} s"
        # Another pid namespace with the same host name would look dead here: hosts, not
        # containers sharing a UTS namespace, are what runs the service.
        if claim.get("host") == self.host and not _alive(claim.get("pid")):
            return f"its process {claim.get('pid')} is gone"
        return ""

    def claim(self, step: int, part: str = "") -> bool:
        """True when this service now owns the snapshot (or its chunk `part`); claims of dead services
        are taken over."""
        url = self._claim_url(step, part)
        if self._create_exclusive(url, self._claim_body()):
            return True
        try:
            other = storage.read_json(url)
        except FileNotFoundError:  # released meanwhile: one more try, never a delete (it may be a new claim)
            return self._create_exclusive(url, self._claim_body())
        except ValueError:  # a claim left torn by a crash (claims are written whole): stale by its age
            other = {"owner": "a crashed service (unreadable claim)", "time": storage.modified(url)}
        why = self._stale(other)
        if not why:
            log(f"step {step}{part}: claimed by {other.get('owner')}, alive; left to it")
            return False
        log(f"step {step}{part}: taking over the claim of {other.get('owner')}: {why}")
        self.release(step, part)
        return self._create_exclusive(url, self._claim_body())

    @contextlib.contextmanager
    def holding(self, step: int, part: str = ""):
        """Renews the claim on `step` (already taken) until the block ends, then releases it."""
        stop = threading.Event()

        def beat():
            while not stop.wait(self.stale_after / STALE_BEATS):
                try:
                    storage.write_bytes(self._claim_url(step, part), self._claim_body())
                except Exception as e:  # the next beat tries again; one miss does not make it stale
                    log(f"step {step}: renewing the claim failed ({_why(e)})")

        t = threading.Thread(target=beat, name=f"claim-{step}", daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()
            self.release(step, part)

    def release(self, step: int, part: str = "") -> None:
        fs, path = storage.fs_path(self._claim_url(step, part))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)

    # ---------------------------------------------------------------- scoring

    @functools.cached_property
    def extractor(self):
        from .extractors import Extractor

        return Extractor(self.metric, self.cfg.eval, self.device)

    @functools.cached_property
    def reference(self):
        from .reference import reference_stats

        return reference_stats(self.clip_cfg, self.extractor, self.progress)

    @functools.cached_property
    def domain(self):
        """evals.digits_cnn's DomainReference for a class-conditional image model with
        eval.classifier_data (and data.shards, what its CNN trains on); None otherwise."""
        e, m = self.cfg.eval, self.cfg.model
        if not (e.classifier_data and m.num_classes > 0 and not m.is_video):
            return None
        if not self.cfg.data.shards:
            log("no domain FID: the digits CNN trains on data.shards, which is not set")
            return None
        from .digits_cnn import domain_reference

        return domain_reference(self.cfg.data.shards, e.classifier_data, m, e.cache_dir, self.progress)

    @functools.cached_property
    def video(self):
        """evals.video_metrics' VideoReference (held-out clips, data-mean frame, frame classifier) for a
        video model with eval.classifier_data; None otherwise."""
        e, m = self.cfg.eval, self.cfg.model
        if not (e.classifier_data and m.is_video and m.cond_frames and self.cfg.data.shards):
            return None
        from .video_metrics import video_reference

        return video_reference(self.cfg.data.shards, e.classifier_data, self.clip_cfg.model, e.num_samples)

    @functools.cached_property
    def cond_frames(self) -> torch.Tensor:
        """Real clips' leading frames, one per sample: what video samples are conditioned on (the
        held-out clips' when eval.classifier_data is set, so predictions can be checked against them)."""
        from rin_scale.data import leading_frames

        if not self.cfg.data.shards:
            raise ConfigError("video evaluation needs data.shards (real clips give the conditioning frames)")
        if self.video is not None:
            return self.video.cond(self.cfg.model.cond_frames)
        return leading_frames(self.cfg.data.shards, self.cfg.model, self.cfg.eval.num_samples)

    def run_once(self, pending=None, limit: int = 0) -> int:
        """Score what is pending (or the given [(step, url)]), at most `limit` snapshots (0 = all);
        returns how many ledger rows were written. Failures of this pass are in self.failed."""
        rows, self.failed = 0, []
        todo = self.pending() if pending is None else pending
        if pending is None and self.cfg.eval.order == "newest" and len(todo) > 1:
            todo = self._skip_older(todo)
        todo = todo[:limit] if limit else todo
        if todo:  # missing weights or real data are the service's error, not a snapshot's
            self.reference
            self.domain
            if self.cfg.model.is_video:
                self.cond_frames
        for step, url in todo:
            try:
                rows += self.score(step, url)
            except Exception as e:
                n = self.failures[step] = self.failures.get(step, 0) + 1
                log(f"step {step}: scoring failed ({_why(e)}); attempt {n} of {MAX_FAILURES}")
                self.failed.append(f"step {step}: {_why(e)}")
                if os.environ.get("RIN_EVAL_DEBUG"):
                    traceback.print_exc()
                if n >= MAX_FAILURES:
                    rows += self._unscored(step, "error", e)
        return rows

    def _skip_older(self, todo: list) -> list:
        """eval.order=newest: the newest snapshot is scored; the older unscored ones get a `skipped` row
        (and so the trainer's retention may delete them)."""
        newest, older = todo[0], [s for s, _ in todo[1:]]
        log(f"step {newest[0]}: scored first (eval.order=newest); skipping the older unscored "
            f"step(s) {', '.join(map(str, older))}")
        for step in older:
            self._final(step, lambda step=step: self._unscored(step, "skipped", RuntimeError(
                f"eval.order=newest: step {newest[0]} was scored instead")))
        return todo[:1]

    def score(self, step: int, url: str) -> int:
        """Scores the chunks of `step` that no service has scored or holds; the service that finds
        every chunk done writes the rows. Returns the ledger rows written (0 while chunks remain)."""
        from rin_scale.rundir import SnapshotError, load_snapshot_model

        if step in self.scored_steps():
            return 0
        try:
            model, dcfg, meta = load_snapshot_model(url, self.device)
            check_finite_weights(model)
        except (SnapshotError, FloatingPointError) as e:
            status = "error" if isinstance(e, FloatingPointError) else (
                "corrupt" if storage.exists(storage.join(url, rundir.COMPLETE)) else "deleted")
            return self._final(step, lambda: self._unscored(step, status, e))
        plan = chunk_plan(self.cfg.eval.num_samples, self.cfg.eval.chunk)
        self._key = self._chunk_key(dcfg)
        for k, (a, b) in enumerate(plan):
            part = f"-{self._key}-chunk-{k:06d}"
            if storage.exists(self._chunk_url(step, k)) or not self.claim(step, part):
                continue
            with self.holding(step, part):
                if storage.exists(self._chunk_url(step, k)):  # finished by another between look and claim
                    continue
                if not storage.exists(storage.join(url, rundir.COMPLETE)):
                    return self._final(step, lambda: self._unscored(step, "deleted", SnapshotError(
                        f"{url} was deleted while being scored (by retention?)")))
                log(f"step {step}: chunk {k + 1} of {len(plan)}, samples {a}-{b - 1}, with {self._sampler(dcfg)} "
                    f"({self._steps(dcfg)} steps) in {self.precision.name} on {self.device}")
                try:
                    state = self._evaluate(step, model, dcfg, a, b)
                except FloatingPointError as e:  # the same weights and noise give the same NaNs: not retried
                    return self._final(step, lambda: self._unscored(step, "error", e))
                storage.write_bytes(self._chunk_url(step, k), _to_bytes(state))
        done = sum(storage.exists(self._chunk_url(step, k)) for k in range(len(plan)))
        if done < len(plan):
            log(f"step {step}: {done} of {len(plan)} chunks scored; the others are held by other services")
            return 0
        return self._final(step, lambda: self._rows(step, url, dcfg, meta, len(plan)))

    def _chunk_key(self, dcfg) -> str:
        """What a chunk's samples and sums depend on: services scoring with other settings (a changed
        command line) keep apart chunks that must not be added up together."""
        import hashlib

        e = self.cfg.eval
        what = [e.num_samples, e.chunk, e.batch, self._sampler(dcfg), self._steps(dcfg), dcfg.guidance,
                self.cfg.train.seed, self.metric, e.inception_weights, e.i3d_weights, e.classifier_data, e.frames]
        return hashlib.sha1(json.dumps(what).encode()).hexdigest()[:10]

    def _chunk_url(self, step: int, k: int) -> str:
        return storage.join(self.run, "eval", "chunks", rundir.step_name(step), self._key, f"chunk-{k:06d}.pt")

    def _final(self, step: int, write) -> int:
        """write() under the step's own claim, once: the ledger row is written by one service."""
        if not self.claim(step):
            return 0
        with self.holding(step):
            if step in self.scored_steps():
                return 0
            n = write()
        fs, path = storage.fs_path(storage.join(self.run, "eval", "chunks", rundir.step_name(step)))
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path, recursive=True)
        return n

    def _merged(self, step: int, chunks: int) -> dict:
        """The chunks' states added up in chunk order (so 1 or N services give the same bits)."""
        from .frechet import FrechetReference

        if self._frechet is None:
            self._frechet = FrechetReference(self.reference.mu, self.reference.sigma, rows=self.reference.rows)
        acc = self._accumulators()
        out = {"grid": [], "correct": 0, "sample_seconds": 0.0, "seconds": 0.0, "precision": set()}
        for k in range(chunks):
            st = torch.load(io.BytesIO(storage.read_bytes(self._chunk_url(step, k))), weights_only=True)
            for name, a in acc.items():
                a.merge(st[name])
            out["grid"] += [st["grid"]] if st["grid"] is not None else []
            out["correct"] += st["correct"]
            out["sample_seconds"] += st["sample_seconds"]
            out["seconds"] += st["seconds"]
            out["precision"].add(st["precision"])
        stats = acc["features"]
        value = self._frechet.distance(*stats.mean_cov(), stats.rows())
        if not math.isfinite(value):
            raise FloatingPointError(f"{self.metric} came out {value}")
        result = {"value": value, "samples": stats.n, "grid": torch.cat(out["grid"]),
                  "sample_seconds": out["sample_seconds"], "seconds": out["seconds"],
                  "precision": "+".join(sorted(out["precision"]))}
        if self._classifier() is not None:
            result["class_accuracy"] = out["correct"] / stats.n
            result["classifier_real_accuracy"] = self._classifier().real_accuracy
        if "video" in acc:
            result.update(acc["video"].result())
        if "domain" in acc:
            result.update(acc["domain"].result())
            if not math.isfinite(result["domain_fid"]):
                raise FloatingPointError(f"domain FID came out {result['domain_fid']}")
        return result

    def _rows(self, step: int, url: str, dcfg, meta: dict, chunks: int) -> int:
        try:
            result = self._merged(step, chunks)
        except FloatingPointError as e:
            return self._unscored(step, "error", e)
        if not storage.exists(storage.join(url, rundir.COMPLETE)):  # no ok row for weights that are gone
            return self._unscored(step, "deleted", FileNotFoundError(
                f"{url} was deleted while being scored (by retention?); its {self.metric} "
                f"{result['value']:.4f} is not recorded"))
        base = {"step": step, "images_seen": meta.get("images_seen"), "samples": result["samples"],
                "sampler": self._sampler(dcfg), "steps": self._steps(dcfg), "guidance": dcfg.guidance,
                "precision": result["precision"], "chunks": chunks,
                "seconds": round(result["seconds"], 2), "sample_seconds": round(result["sample_seconds"], 2),
                "status": "ok"}
        out = [{**base, "metric": self.metric, "value": result["value"], "extractor": self.extractor.id,
                "reference": self.reference.url, "reference_samples": self.reference.n}]
        if "class_accuracy" in result:
            out.append({**base, "metric": "class_accuracy", "value": result["class_accuracy"],
                        "classifier": "sklearn SVC(C=10) on pixels",
                        "classifier_real_accuracy": result["classifier_real_accuracy"],
                        "classifier_data": self.cfg.eval.classifier_data})
        if "frame_mse" in result:
            out += self._video_rows(base, result)
        if "domain_fid" in result:
            dom = self.domain
            out.append({**base, "metric": "domain_fid", "value": result["domain_fid"], "floor": dom.floor,
                        "floor_samples": dom.floor_n, "extractor": dom.id, "reference": dom.url,
                        "reference_samples": dom.n, "cnn_heldout_accuracy": dom.heldout_accuracy})
            out.append({**base, "metric": "laplacian_ratio", "value": result["laplacian_ratio"],
                        "sample_laplacian": result["sample_laplacian"], "real_laplacian": dom.real_laplacian})
        for row in out[1:] + out[:1]:  # the primary row last: it is what marks the step done
            self._append(row)
        self._tensorboard(step, result, out)
        self._log_result(step, result)
        return len(out)

    def _log_result(self, step: int, result: dict) -> None:
        extra = (f", class accuracy {result['class_accuracy']:.3f} (classifier on real held-out data: "
                 f"{result['classifier_real_accuracy']:.3f})" if "class_accuracy" in result else "")
        if "domain_fid" in result:
            extra += (f", domain FID {result['domain_fid']:.3f} (real held-out: {result['domain_fid_floor']:.3f}), "
                      f"Laplacian ratio {result['laplacian_ratio']:.2f}")
        if "frame_mse" in result:
            r = result
            extra += (f", frame MSE {r['frame_mse']:.4f} (repeat last frame {r['frame_mse_repeat_last']:.4f}, "
                      f"data mean {r['frame_mse_data_mean']:.4f}), digit recognised in {r['frame_accuracy']:.1%} "
                      f"of predicted frames (true frames: {r['frame_accuracy_real']:.1%})")
        log(f"step {step}: {self.metric.upper()} {result['value']:.4f} from {result['samples']} samples "
            f"in {result['seconds']:.0f} s of scoring (sampling {result['sample_seconds']:.0f} s){extra}")

    def _video_rows(self, base: dict, result: dict) -> list[dict]:
        r = result
        mse = {**base, "metric": "frame_mse", "value": r["frame_mse"], "per_frame": r["frame_mse_per_frame"],
               "repeat_last": r["frame_mse_repeat_last"], "repeat_last_per_frame": r["frame_mse_repeat_last_per_frame"],
               "data_mean": r["frame_mse_data_mean"], "data_mean_per_frame": r["frame_mse_data_mean_per_frame"],
               "data_mean_is": f"mean frame (per pixel and channel) of {self.video.train_clips} training clips",
               "space": "[-1, 1] pixels", "heldout_data": self.video.heldout_url, "clips": r["clips"]}
        acc = {**base, "metric": "frame_accuracy", "value": r["frame_accuracy"], "real": r["frame_accuracy_real"],
               "classifier": f"sklearn SVC(C=10) on grey digit crops of {self.video.classifier.n} training frames",
               "heldout_data": self.video.heldout_url}
        return [mse, acc]

    def _sampler(self, dcfg) -> str:
        return self.cfg.eval.sampler or dcfg.sampler

    @functools.cached_property
    def precision(self):
        """The trainer's rule (train.precision, default auto), the precision the model trained in:
        bf16 autocast on GPUs and on CPUs whose bf16 matmul is clearly faster, fp32 elsewhere."""
        from rin_scale.engine import choose_precision

        p = choose_precision(self.cfg.train.precision, self.device)
        log(f"sampling precision {p.name} ({p.reason})")
        return p

    def _steps(self, dcfg) -> int:
        return self.cfg.eval.steps or dcfg.sample_steps

    def _classifier(self):
        m = self.cfg.model
        if self.cfg.eval.classifier_data and m.num_classes > 0 and not m.is_video:
            from .classifier import get_classifier

            return get_classifier(self.cfg.eval.classifier_data, m)
        return None

    def _accumulators(self) -> dict:
        """What a chunk keeps for each measure, with state() and merge()."""
        acc = {"features": FeatureStats(self.extractor.net.num_features)}
        if self._classifier() is not None and self.domain is not None:
            from .digits_cnn import DomainScore

            acc["domain"] = DomainScore(self.domain)
        if self.cfg.model.is_video and self.video is not None:
            from .video_metrics import VideoScore

            acc["video"] = VideoScore(self.video, self.cfg.model.cond_frames)
        return acc

    def _evaluate(self, step: int, model, dcfg, start: int, stop: int) -> dict:
        """Samples start..stop of the snapshot (noise from (train.seed, sample index)) and what the
        metrics need of them: the state a chunk keeps."""
        from rin_scale.sample import sample_labels, sample_range

        e, m = self.cfg.eval, model.cfg
        t_start = time.time()
        acc, classifier = self._accumulators(), self._classifier()
        labels = sample_labels(stop, m.num_classes)
        conds = self.cond_frames if m.is_video else None
        correct, grid, shown, sample_seconds = 0, [], 16 if m.is_video else 64, 0.0
        kept = [] if e.keep_samples else None
        bar = tqdm(total=stop - start, desc=f"step {step}", unit="sample", disable=not self.progress,
                   file=sys.stderr)
        batches = sample_range(model, dcfg, start, stop, e.batch, self.cfg.train.seed, labels, conds,
                               self._steps(dcfg), self._sampler(dcfg), frames=self.clip_cfg.model.frames)
        while True:
            t0 = time.perf_counter()
            with self.precision.autocast(self.device):
                a, x = next(batches, (None, None))
            if x is None:
                break
            x = x.float()
            sample_seconds += time.perf_counter() - t0
            if not torch.isfinite(x).all():  # clamped and rounded to uint8, NaNs would score as black
                raise FloatingPointError("non-finite samples (NaN or inf): the snapshot's weights are broken")
            x = x.clamp(-1, 1)
            if "video" in acc:
                acc["video"].update(x, a)
            if conds is not None:  # FVD scores the whole clip: given frames, then predicted ones
                x = torch.cat([conds[a:a + len(x)].to(x.device).float(), x], dim=2)
            feats = self.extractor.net(x.to(self.device))
            acc["features"].update(feats)  # raises FloatingPointError on non-finite features
            if classifier is not None:
                correct += int((classifier.predict(x) == labels[a:a + len(x)].numpy()).sum())
            if "domain" in acc:
                acc["domain"].update(x)
            if a < shown:
                grid.append(x[: shown - a].cpu())
            if kept is not None:
                kept.append(to_uint8(x.cpu()).movedim(1, -1).numpy())
            bar.update(len(x))
        bar.close()
        if kept is not None:
            self._keep_samples(step, start, stop, kept, labels)
        return {**{k: v.state() for k, v in acc.items()}, "correct": correct,
                "grid": torch.cat(grid) if grid else None, "sample_seconds": sample_seconds,
                "seconds": time.time() - t_start, "precision": self.precision.name}

    def _keep_samples(self, step: int, start: int, stop: int, kept: list, labels) -> None:
        import numpy as np

        buf = io.BytesIO()
        arrays = {"arr_0": np.concatenate(kept)}
        if labels is not None:
            arrays["arr_1"] = labels[start:stop].numpy()
        np.savez(buf, **arrays)
        storage.write_bytes(samples_url(self.run, step, start), buf.getvalue())

    # ---------------------------------------------------------------- outputs

    def _append(self, row: dict) -> None:
        ledger.append(self.run, {**row, "time": time.time()}, self.owner)

    def _unscored(self, step: int, status: str, e: Exception) -> int:
        """A row saying why the snapshot has no score; it is not tried again."""
        log(f"step {step}: not scored, {status}: {_why(e)}")
        if status in ("corrupt", "error"):  # a snapshot that failed: --once exits non-zero
            self.failed.append(f"step {step}: {status}: {_why(e)}")
        self._append({"step": step, "metric": self.metric, "value": None, "status": status, "error": _why(e)})
        return 1

    def _tensorboard(self, step: int, result: dict, rows: list[dict]) -> None:
        from rin_scale.tblog import TBLog, sample_grid

        if self._tb is None:
            self._tb = TBLog(self.run, subdir="eval/tb")
        scalars = {f"eval/{r['metric']}": r["value"] for r in rows}
        scalars["eval/classifier_real_accuracy"] = result.get("classifier_real_accuracy")  # None: skipped
        scalars["eval/domain_fid_floor"] = result.get("domain_fid_floor")
        for k in ("frame_mse_repeat_last", "frame_mse_data_mean", "frame_accuracy_real"):
            scalars[f"eval/{k}"] = result.get(k)
        for i, v in enumerate(result.get("frame_mse_per_frame", [])):
            scalars[f"eval/frame_mse_by_frame/{i + 1}"] = v
        self._tb.scalars(scalars, step)
        self._tb.image("eval/samples", sample_grid(result["grid"]), step)
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


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
    from rin_scale.perf import keep_freed_memory

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
        from rin_scale.config import mask_secrets  # the run's URL may carry a credential

        log(f"watching {mask_secrets(args.run)}: {svc.metric.upper()}, {svc.cfg.eval.num_samples} samples per snapshot, "
            f"order={svc.cfg.eval.order}, device={svc.device}")
        if svc.device.type == "cpu":  # sampling and feature extraction reuse their buffers (as the trainer)
            log(f"CPU memory: {keep_freed_memory()}")
        while True:
            n = svc.run_once(limit=args.limit)
            if args.once and svc.failed:
                print(f"error: {len(svc.failed)} snapshot(s) failed to score ({n} ledger row(s) written); "
                      f"{svc.failed[0]}", file=sys.stderr)
                return 1
            if args.once:
                log(f"done: {n} ledger row(s) written")
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
