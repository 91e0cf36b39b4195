"""The commands of README.md and the package READMEs, and the form in which each runs here.

A README command is written for a user's cluster (buckets, GPUs, SLURM, a dataset on disk); this
machine has none of those. `local_form` turns one command into what can run on a 2-core CPU
machine: placeholders become small local data, cluster commands get `--dry-run`, long jobs a few
steps. A command no rule knows fails the test, so a new README command cannot go unchecked.
"""
from __future__ import annotations

import re
import shlex
import sys

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)

# Commands that cannot run in the suite, and why. Keyed by the program or module.
NOT_HERE = {
    "install.sh": "installs the environment the suite runs in",
    "pip": "installs into the cluster's environment",
    "pytest": "the suite itself",
}
# Modules that run as written, on the local data the placeholders stand for.
AS_WRITTEN = {"data_tools.shard", "data_tools.check", "rin_scale.info", "rin_scale.config", "launch.status"}
# Cluster and long-running commands: their own dry-run checks flags and config without running the job.
DRY_RUN = {"launch.submit", "rin_scale.train", "launch.demo"}
# Commands that sample: the same flags, a few sampling steps and samples (later flags win in argparse).
SHORTENED = {
    "rin_scale.sample": ["--n", "4", "--steps", "2"],
    "rin_scale.routing": ["--n", "1", "--steps", "2"],
    "evals.service": ["--once"],  # on a run whose snapshots are scored: checks flags, scores nothing twice
    "evals.reference": ["eval.reference_samples=16"],
}


def fenced(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def shell_commands(body: str) -> list[list[str]]:
    """A bash block's commands as argv lists: continuation lines joined, comments dropped, `a && b`
    split into a and b."""
    commands = []
    for line in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv:
            cut = argv.index("&&") if "&&" in argv else len(argv)
            commands.append(argv[:cut])
            argv = argv[cut + 1:]
    return commands


def substitute(s: str, places: dict[str, str]) -> str:
    """s with its placeholders replaced: paths and URLs wherever they occur (the longest first: a
    snapshot inside a run inside a bucket), a bare word such as RUN only as the whole of s."""
    if s in places:
        return places[s]
    for placeholder in sorted((p for p in places if "/" in p), key=len, reverse=True):
        s = s.replace(placeholder, places[placeholder])
    return s


def local_form(argv: list[str], places: dict[str, str]) -> tuple[list[str] | None, dict, str]:
    """(argv to run here or None, extra environment, why not / what was changed)."""
    argv = [substitute(a, places) for a in argv]
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):  # VAR=value prefixes (DS_BUILD_OPS=0)
        argv = argv[1:]
    prog = argv[0].rsplit("/", 1)[-1]
    if prog == "bash" and argv[1:2] == ["install.sh"]:
        return None, {}, NOT_HERE["install.sh"]
    if prog in NOT_HERE:
        return None, {}, NOT_HERE[prog]
    if prog == "tensorboard":  # the same logdir, read and summarised instead of served
        return [sys.executable, "-m", "tensorboard.main", "--inspect", *argv[1:]], {}, "--inspect"
    env = {}
    if argv[1:3] == ["-m", "launch.torchrun"]:  # the project's torchrun: the same options
        argv, prog = ["torchrun", *argv[3:]], "torchrun"
    if prog == "torchrun":  # one process checks what each of the launcher's ranks would run
        nproc = next((a.split("=", 1)[1] for a in argv if a.startswith("--nproc_per_node=")), "1")
        argv = ["python", *argv[argv.index("-m"):]]
        env["WORLD_SIZE"] = nproc
    elif not re.fullmatch(r"python3?", prog):
        raise AssertionError(f"README command {shlex.join(argv)!r}: no rule for {prog!r} in tests/readme_commands.py")
    if "-m" not in argv:
        raise AssertionError(f"README command {shlex.join(argv)!r}: expected `python -m MODULE`")
    module = argv[argv.index("-m") + 1]
    rest = argv[argv.index("-m") + 2:]
    if module in NOT_HERE:
        return None, {}, NOT_HERE[module]
    if module in DRY_RUN:
        extra, how = ([] if "--dry-run" in rest else ["--dry-run"]), "--dry-run"
        if module == "launch.submit" and "--executor" not in rest:  # the sbatch script, where no sbatch is
            extra, how = extra + ["--executor", "slurm"], "--dry-run --executor slurm"
    elif module in SHORTENED:
        extra, how = SHORTENED[module], "shortened: " + " ".join(SHORTENED[module])
    elif module in AS_WRITTEN:
        extra, how = [], "as written"
    else:
        raise AssertionError(f"README command {shlex.join(argv)!r}: module {module} has no rule in "
                             "tests/readme_commands.py (run it as written, dry, or shortened)")
    unmapped = [a for a in rest if re.search(r"\b(gs|s3)://", a)]
    if unmapped:
        raise AssertionError(f"README command {shlex.join(argv)!r}: no local stand-in for {unmapped}: add it to "
                             "the places of tests/test_readme.py")
    return [sys.executable, "-m", module, *rest, *extra], env, how
