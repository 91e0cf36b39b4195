"""Submit the trainer or the eval service through submitit: SLURM, or local processes.

    python -m launch.submit imagenet256 train.run_dir=/shared/runs/i256 \\
        --nodes 4 --gpus-per-node 8 --partition gpu --time-min 2880 --setup "module load cuda"
    python -m launch.submit tiny train.run_dir=runs/t --executor local --tasks-per-node 2
    python -m launch.submit --service eval train.run_dir=runs/t --executor local
    python -m launch.submit --service shard /data/imagenet/train gs://b/imagenet256 --resize 256 \
        --workers 16 --nodes 8 --wait
    ... --dry-run     prints the sbatch script and the resolved config; submits nothing

Before a training job waits in the queue, data.shards is checked from here as the trainer checks it
at start-up (set, listable, complete tars, classes that fit the model, enough samples): a problem
is one line, exit 2 (with --dry-run, a warning); shards that cannot be listed from here within
30 s are left to the job (--skip-data-check skips the check).

--service shard runs data_tools.shard as N = nodes x tasks-per-node tasks, task r writing part r of
N (--part auto; each part resumes on its own), the last part to finish writing the one manifest;
the options after SOURCE OUT are data_tools.shard's. --cpus-per-task defaults to its --workers.
With --wait the parts are joined here once the job ends, if no part did. Logs and launch.jsonl go
to --folder (default ./submitit/rin-shard-NAME).

One task per GPU. The job requeues itself on preemption or timeout (a training job saves a state
first, at the step the signal reached), and after a retryable failure (a hung rank, a crashed
rank, a lost node: after --requeue-backoff-s, doubled for each failure), up to --max-requeues in
all; the trainer resumes from the newest complete state. One rank down ends the job (srun
--kill-on-bad-exit). RUN/launch.jsonl logs every submission, start, requeue (and why) and end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import typing as tp

import submitit
from submitit.slurm.slurm import SlurmExecutor, _convert_mem

from rin_scale import storage
from rin_scale.config import ConfigError, Config, check_world, dump_yaml, load_config

from .job import LaunchJob, EvalJob, TrainJob, log_event
from .local import PreemptibleLocalExecutor


class LaunchError(ValueError):
    """Bad launch options; the message names the option and the fix."""


class _SlurmScript(SlurmExecutor):
    """SlurmExecutor that can render its sbatch script where no srun is installed (--dry-run)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def parse_args(argv: tp.Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("config", nargs="*", help="[PRESET] [file.yaml ...] [section.key=value ...]")
    p.add_argument("--service", choices=("train", "eval", "shard"), default="train",
                   help="what the job runs: the trainer, the eval service beside it, or data_tools.shard "
                        "split over the tasks (then give SOURCE OUT and its options)")
    p.add_argument("--executor", choices=("auto", "slurm", "local"), default="auto",
                   help="auto: slurm when sbatch is on PATH, else local processes")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0 = CPU only")
    p.add_argument("--tasks-per-node", type=int, default=0, help="default: --gpus-per-node, or 1")
    p.add_argument("--cpus-per-task", type=int, default=0)
    p.add_argument("--mem-gb", type=float, default=0, help="memory per node (0 = the cluster's default)")
    p.add_argument("--partition", default="")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--constraint", default="")
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--time-min", type=int, default=24 * 60, help="time limit of one job, minutes")
    p.add_argument("--job-name", default="", help="default: rin-SERVICE-CONFIGNAME")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="extra sbatch parameter, e.g. --sbatch mail-type=END (repeatable)")
    p.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="shell line run before the tasks, e.g. 'module load cuda' (repeatable)")
    p.add_argument("--folder", default="", help="submitit's folder (logs, pickles); shared by all nodes. "
                   "Default: RUN/submitit for a local RUN, else ./submitit/NAME")
    p.add_argument("--max-requeues", type=int, default=10,
                   help="requeues allowed (preemptions, timeouts and retryable failures)")
    p.add_argument("--requeue-backoff-s", type=float, default=60.0,
                   help="wait before requeueing after a failure (hang, crashed rank); doubled per failure")
    p.add_argument("--signal-delay-s", type=int, default=120,
                   help="seconds before the time limit at which the job is told to requeue")
    p.add_argument("--master-addr", default="",
                   help="rendezvous address (default: the first node's hostname)")
    p.add_argument("--python", default="", help="interpreter the tasks run (default: this one, "
                   f"{sys.executable}); e.g. 'python' after a --setup line that activates an environment")
    p.add_argument("--once", action="store_true", help="eval service: evaluate what exists, then exit")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit with its status")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    p.add_argument("--skip-data-check", action="store_true",
                   help="submit without first listing data.shards from here (e.g. a path only the nodes see)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if _service(argv) != "shard":
        args = p.parse_intermixed_args(argv)
        args.shard_argv = []
        return args
    mine, theirs = _split_shard_argv(p, argv)
    args = p.parse_intermixed_args(mine)
    args.shard_argv = theirs
    return args


def _service(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--service" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--service="):
            return a.split("=", 1)[1]
    return "train"


def _split_shard_argv(p: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(this launcher's options, data_tools.shard's arguments): an option is the launcher's when it
    names one of its options exactly; everything else (SOURCE OUT, --resize 256, ...) is the tool's."""
    from data_tools.shard import build_parser

    def arity(parser):
        return {o: a.nargs != 0 for a in parser._actions for o in a.option_strings}

    mine_opts, theirs_opts = arity(p), arity(build_parser())
    mine, theirs, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0]
        if name in mine_opts:
            dest, takes = mine, mine_opts[name]
        else:
            dest, takes = theirs, theirs_opts.get(name, False)
        dest.append(a)
        if takes and "=" not in a and i + 1 < len(argv):
            dest.append(argv[i + 1])
            i += 1
        i += 1
    return mine, theirs


def shard_job_name(args) -> str:
    return args.job_name or f"rin-shard-{shard_command(args).paths[1].rstrip('/').rsplit('/', 1)[-1]}"


def shard_command(args) -> argparse.Namespace:
    """data_tools.shard's own parse of the --service shard arguments; its errors as a LaunchError."""
    from data_tools.shard import build_parser

    p = build_parser()

    def error(message):
        raise LaunchError(f"data_tools.shard: {message}")

    p.error = error
    ns = p.parse_args(args.shard_argv)
    if ns.embedded or ns.join or len(ns.paths) != 2:
        raise LaunchError("--service shard: give SOURCE OUT and data_tools.shard's options "
                          "(not --embedded or --join: those run on one machine)")
    if ns.part:
        raise LaunchError("--service shard: leave out --part: task r of N writes part r of N")
    return ns


def resolve(args: argparse.Namespace) -> tuple[Config, str, list[str]]:
    """(config, run_dir, argv for the service) from the positional config arguments."""
    # YAML files by absolute path (the job may start elsewhere); a preset name stays a name even when
    # a folder of that name (say the shards just written to ./imagenet256) is in the working directory
    items = [os.path.abspath(a) if a.endswith((".yaml", ".yml")) and os.path.exists(a) else a for a in args.config]
    if args.service == "shard":
        ns = shard_command(args)
        out = ns.paths[1]
        if storage.is_local(out):  # the tasks may start elsewhere
            out = os.path.abspath(storage.local_path(out))
        src = ns.paths[0] if "://" in ns.paths[0] else os.path.abspath(ns.paths[0])
        rest = [a for a in args.shard_argv if a not in ns.paths]
        run = os.path.abspath(args.folder or os.path.join("submitit", shard_job_name(args)))
        return None, run, [src, out, *rest, "--part", "auto", "--quiet"]
    if args.service == "train":
        cfg = load_config(None, items)
        run = cfg.train.run_dir
        if storage.is_local(run):
            run = os.path.abspath(storage.local_path(run))
            cfg.train.run_dir = run
        return cfg, run, [*items, f"train.run_dir={run}"]
    # eval: the run's own config when it exists, with the overrides on top
    overrides = [a for a in items if "=" in a and not a.startswith("train.run_dir=")]
    runs = [a.split("=", 1)[1] for a in items if a.startswith("train.run_dir=")]
    if not runs:
        raise LaunchError("--service eval needs the run: add train.run_dir=RUN")
    run = os.path.abspath(runs[-1]) if storage.is_local(runs[-1]) else runs[-1]
    saved = storage.join(run, "config.yaml")
    fs, path = storage.fs_path(saved)
    cfg = load_config(None, [saved, *overrides] if fs.exists(path) else [*items, *overrides])
    cfg.train.run_dir = run
    return cfg, run, [*(["--once"] if args.once else []), *overrides]


def tasks_per_node(args) -> int:
    return args.gpus_per_node or args.tasks_per_node or 1


def slurm_parameters(args, name: str) -> dict:
    """submitit SlurmExecutor parameters (its own names) from the options."""
    p: dict[str, tp.Any] = dict(job_name=name, nodes=args.nodes, ntasks_per_node=tasks_per_node(args),
                                time=args.time_min, signal_delay_s=args.signal_delay_s)
    if args.service == "train":
        # One rank down, the job down: srun ends the other tasks at once instead of leaving them
        # in a collective; and SLURM requeues the job itself when a node is lost.
        p["srun_args"] = ["--kill-on-bad-exit=1"]
    if args.gpus_per_node:
        p["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        p["cpus_per_task"] = args.cpus_per_task
    if args.mem_gb:
        p["mem"] = _convert_mem(args.mem_gb)
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(args, key):
            p[key] = getattr(args, key)
    if args.exclusive:
        p["exclusive"] = True
    if args.setup:
        p["setup"] = list(args.setup)
    extra = {}
    for kv in args.sbatch:
        if "=" not in kv:
            raise LaunchError(f"--sbatch {kv!r}: write it as KEY=VALUE, e.g. --sbatch mail-type=END")
        k, v = kv.split("=", 1)
        extra[k.strip().lstrip("-")] = v
    if args.service == "train":
        extra.setdefault("requeue", True)
    if extra:
        p["additional_parameters"] = extra
    return p


def check_options(args, cfg: Config, executor: str) -> None:
    if args.nodes < 1 or args.gpus_per_node < 0 or args.tasks_per_node < 0:
        raise LaunchError("--nodes must be at least 1; --gpus-per-node and --tasks-per-node 0 or more")
    if args.gpus_per_node and args.tasks_per_node and args.tasks_per_node != args.gpus_per_node:
        raise LaunchError(f"--tasks-per-node={args.tasks_per_node} differs from --gpus-per-node="
                          f"{args.gpus_per_node}: the job runs one task per GPU; drop --tasks-per-node")
    if executor == "local" and args.nodes != 1:
        raise LaunchError(f"--executor local runs on this machine only: use --nodes 1 (got {args.nodes})")
    if args.time_min * 60 <= args.signal_delay_s:
        raise LaunchError(f"--time-min={args.time_min} leaves no time before the requeue signal "
                          f"(--signal-delay-s={args.signal_delay_s}): give a longer time limit or a shorter delay")
    if args.max_requeues < 0:
        raise LaunchError("--max-requeues must be 0 or more")
    if args.requeue_backoff_s < 0:
        raise LaunchError("--requeue-backoff-s must be 0 or more (seconds)")
    if args.service == "train":
        check_world(cfg, args.nodes * tasks_per_node(args))
    elif args.service == "shard":
        if args.gpus_per_node:
            raise LaunchError("--service shard runs on CPUs: drop --gpus-per-node (use --tasks-per-node)")
    # --service eval: each of the nodes x GPUs tasks is a service of its own, sharing the snapshots'
    # chunks through their claims (evals.service); no collective ties them together.


DATA_CHECK_SECONDS = 30.0  # listing data.shards from here; longer (a slow or unreachable bucket): not checked


def check_data(cfg: Config, world: int, timeout: float = DATA_CHECK_SECONDS) -> str:
    """What the trainer checks at start-up (rin_scale.data.check_dataset), checked before the job
    waits in the queue: data.shards set, listable, every tar complete (without a manifest), classes
    that fit the model, a batch for every rank. Raises LaunchError for data the job would stop on;
    returns a warning line when the shards could not be listed from here (storage unreachable, no
    credentials on this machine, slower than `timeout` seconds), '' when all is well."""
    from rin_scale.config import mask_secrets
    from rin_scale.data import DataError, check_dataset
    from rin_scale.shards import ListingError

    if not cfg.data.shards:
        raise LaunchError("data.shards is empty: set data.shards=URL of a shard folder or manifest "
                          "(make one with: python -m data_tools.shard --embedded digits OUT)")
    micro, _ = check_world(cfg, world)
    found: dict = {}

    def work():
        try:
            check_dataset(cfg.data, cfg.model, micro, world)
        except BaseException as e:  # noqa: BLE001 - classified below
            found["error"] = e

    t = threading.Thread(target=work, name="check-data", daemon=True)
    t.start()
    t.join(timeout)
    url = mask_secrets(cfg.data.shards)  # these lines end up in terminals and job logs
    if t.is_alive():
        return (f"data.shards={url} not checked: no listing within {timeout:.0f} s from here; "
                f"the job checks it when it starts")
    e = found.get("error")
    if isinstance(e, DataError) and not isinstance(e, ListingError):
        raise LaunchError(mask_secrets(str(e)))
    if e is not None:  # this machine may lack the nodes' network or credentials: not a verdict
        c = e.__cause__ if isinstance(e, ListingError) and e.__cause__ is not None else e
        why = mask_secrets((str(c).strip().splitlines() or [""])[0][:300])
        return f"data.shards={url} not checked: listing it from here failed ({type(c).__name__}: {why}); " \
               f"the job checks it when it starts"
    return ""


def make_executor(args, run: str, name: str, executor: str):
    folder = args.folder or (run if args.service == "shard" else "")
    if not folder:
        folder = storage.join(run, "submitit") if storage.is_local(run) else os.path.join("submitit", name)
    folder = os.path.join(os.path.abspath(folder), args.service)
    if executor == "slurm":
        cls = SlurmExecutor if shutil.which("srun") else _SlurmScript
        ex = cls(folder, max_num_timeout=args.max_requeues, python=args.python or None)
        ex.update_parameters(**slurm_parameters(args, name))
        return ex
    ex = PreemptibleLocalExecutor(folder, max_num_timeout=args.max_requeues, python=args.python or None)
    params = dict(tasks_per_node=tasks_per_node(args), timeout_min=args.time_min,
                  signal_delay_s=args.signal_delay_s, gpus_per_node=args.gpus_per_node)
    if args.setup:
        params["setup"] = list(args.setup)
    ex.update_parameters(**params)
    return ex


def sbatch_script(ex) -> str:
    """The sbatch script the executor submits (submitit's own rendering)."""
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def make_job(args, cfg: Config, run: str, argv: list[str]) -> LaunchJob:
    kw = dict(max_requeues=args.max_requeues, master_addr=args.master_addr or None, timeout_min=args.time_min,
              signal_delay_s=args.signal_delay_s)
    if args.service == "shard":
        return LaunchJob("data_tools.shard:main", list(argv), run, kind="shard", **kw)
    return TrainJob(argv, run, backoff_s=args.requeue_backoff_s, **kw) if args.service == "train" \
        else EvalJob(argv, run, **kw)


def submit(argv: tp.Optional[list[str]] = None):
    """Parse, validate, and submit (or print, with --dry-run). Returns the submitit job or None."""
    return _submit(parse_args(argv))


def _submit(args: argparse.Namespace):
    executor = args.executor
    if executor == "auto":
        executor = "slurm" if shutil.which("sbatch") else "local"
    cfg, run, service_argv = resolve(args)
    check_options(args, cfg, executor)
    warning = ""
    if args.service == "train" and not args.skip_data_check:
        try:
            warning = check_data(cfg, args.nodes * tasks_per_node(args))
        except LaunchError as e:
            if not args.dry_run:
                raise
            warning = f"{e} (a submit would stop here)"
    if args.service == "shard":
        name = args.job_name or shard_job_name(args)
        if not args.cpus_per_task:  # one core per shard worker process
            args.cpus_per_task = max(1, shard_command(args).workers)
    else:
        name = args.job_name or f"rin-{args.service}-{cfg.name}"
    ex = make_executor(args, run, name, executor)
    if warning:  # after the executor's own option errors, which come alone
        print(f"warning: {warning}", file=sys.stderr)
    if args.dry_run:
        if executor == "slurm":
            print("# ---- sbatch script ----")
            print(sbatch_script(ex))
        else:
            print(f"# ---- local job: {tasks_per_node(args)} task(s) on this machine, submitit folder {ex.folder}")
        if cfg is None:
            print(f"# ---- each of the {args.nodes * tasks_per_node(args)} task(s) runs ----")
            print("python -m data_tools.shard " + " ".join(service_argv))
            return None
        print("# ---- resolved config ----")
        print(dump_yaml(cfg), end="")
        return None
    job_fn = make_job(args, cfg, run, service_argv)
    # a job submitted from inside another job must not inherit its SLURM/rank variables
    conf = os.environ.get("SLURM_CONF")  # which cluster to talk to is not the job's state: keep it
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        job = ex.submit(job_fn)
    log_event(run, "submitted", kind=args.service, job_id=str(job.job_id), executor=executor,
              nodes=args.nodes, tasks_per_node=tasks_per_node(args), gpus_per_node=args.gpus_per_node,
              folder=str(ex.folder), name=name)
    print(f"submitted {args.service} job {job.job_id} ({executor}, {args.nodes} node(s) x "
          f"{tasks_per_node(args)} task(s)); run: {run}; logs: {ex.folder}")
    print(f"status: python -m launch.status {run}")
    return job


def main(argv: tp.Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        job = _submit(args)
    except (ConfigError, LaunchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if job is not None and args.wait:
        try:
            job.results()
        except Exception as e:
            print(f"job {job.job_id} failed: {str(e).strip().splitlines()[-1] if str(e).strip() else e}",
                  file=sys.stderr)
            return 1
        print(f"job {job.job_id} finished")
        if args.service == "shard":
            return _join_after(args)
    return 0


def _join_after(args) -> int:
    """--service shard --wait: the joined manifest (written by the last part, or here), in one line."""
    from data_tools.shard import ShardError, join_parts

    ns = shard_command(args)
    out = os.path.abspath(ns.paths[1]) if storage.is_local(ns.paths[1]) else ns.paths[1]
    try:
        man = join_parts(out, ns.prefix)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{out}: {man['total']} {man['kind']} samples from {man['inputs']} inputs in {len(man['shards'])} "
          f"shards, {man.get('parts', 1)} part(s), {len(man['classes'])} classes ({ns.prefix}-manifest.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
