"""Every command in README.md and evals/README.md runs, so the READMEs cannot drift from the code.

The commands are taken from the READMEs' fenced blocks and run in the order written, as a user
would follow them, in the form that can run on this machine (tests/readme_commands.py): the cluster
commands with `--dry-run`, the samplers with a few steps, everything else as written. The
placeholders stand for small local data: a class folder of images and one of mp4 videos (for
`/data/...`), local folders (for `gs://my-bucket/...`), and the session's shortened demo run (for
the runs and snapshots the READMEs name). Stand-ins: local folders for buckets, `--dry-run` for
SLURM and GPUs, the CPU for `cuda` in the notebook snippet.
"""
import os
import shlex
import subprocess
import sys

import numpy as np
from PIL import Image

from readme_commands import fenced, local_form, shell_commands, substitute

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", "evals/README.md")


def make_sources(tmp):
    """A class folder of photos (two classes, odd sizes) and one of short mp4 videos."""
    from rin_scale.media import encode_mp4

    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (tmp / "images" / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(tmp / "images" / name / f"{i}.jpg")
        (tmp / "videos" / name).mkdir(parents=True)
        (tmp / "videos" / name / "v0.mp4").write_bytes(encode_mp4(rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8)))


def places_for(tmp, demo_out) -> dict:
    run = str(demo_out / "run-tiny")
    snapshot = sorted(os.listdir(os.path.join(run, "snapshots")))[-1]
    (tmp / "my_run.yaml").write_text("preset: imagenet256\ntrain:\n  global_batch: 512\n")
    return {
        "/data/imagenet/train": str(tmp / "images"), "/data/kinetics600": str(tmp / "videos"),
        "gs://my-bucket/imagenet256": str(tmp / "imagenet256"), "gs://my-bucket/k600": str(tmp / "k600"),
        "gs://my-bucket/runs/i256/snapshots/step-000150000": os.path.join(run, "snapshots", snapshot),
        "gs://my-bucket/runs/i256": run, "/shared/states/i256": str(tmp / "states"),
        "/scratch/runs/first-gpu": str(tmp / "first-gpu"), "gs://b/cifar10": str(demo_out / "data" / "digits-train"),
        "runs/demo": str(demo_out), "runs/video24k": str(tmp / "video24k"),
        # evals/README.md
        "gs://bucket/runs/NAME": run, "gs://bucket/cifar10-train": str(demo_out / "data" / "digits-train"),
        "RUN": run,
    }


def test_every_readme_command_runs_here(demo_run, tmp_path):
    demo_out, _ = demo_run
    make_sources(tmp_path)
    places = places_for(tmp_path, demo_out)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "2"}
    env.pop("WORLD_SIZE", None)
    ran, skipped = [], []
    for readme in READMES:
        text = open(os.path.join(ROOT, readme)).read()
        for lang, body in fenced(text):
            if lang == "python":  # the notebook snippet, on the CPU
                code = substitute(body, places).replace('"cuda"', '"cpu"')
                p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                                   text=True, timeout=600)
                assert p.returncode == 0, f"{readme}: python snippet failed:\n{code}\n{p.stderr[-3000:]}"
                ran.append("python snippet")
                continue
            if lang != "bash":
                continue
            for written in shell_commands(body):
                argv, extra_env, how = local_form(written, places)
                if argv is None:
                    skipped.append((shlex.join(written), how))
                    continue
                p = subprocess.run(argv, cwd=tmp_path, env={**env, **extra_env}, capture_output=True, text=True,
                                   timeout=600)
                assert p.returncode == 0, (f"{readme}: `{shlex.join(written)}` failed here ({how}):\n"
                                           f"$ {shlex.join(argv)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
                ran.append(shlex.join(written))
    # what was not run is only what cannot run in a test; what did run covers the guide
    assert {why for _, why in skipped} <= {"installs the environment the suite runs in",
                                           "installs into the cluster's environment", "the suite itself"}, skipped
    assert len(ran) >= 20, ran
    # the guide's data steps left what the later steps read
    assert (tmp_path / "imagenet256").exists() and (tmp_path / "k600").exists()
    assert (tmp_path / "preview.png").exists() and (tmp_path / "samples.png").exists()
