"""The samples the eval service scored, as one ADM-style .npz (`arr_0` uint8 NHWC, labels `arr_1`).

    python -m evals.export RUN --step N --out samples.npz

Needs eval.keep_samples=true while the service scored step N: each chunk then kept its samples under
RUN/eval/samples/step-N/. They are joined in sample order and streamed into the file, one chunk in
memory at a time (rin_scale.sample.NpzWriter, the writer of `rin_scale.sample --npz`).
"""
from __future__ import annotations

import argparse
import io
import sys

import numpy as np

from rin_scale import rundir, storage
from rin_scale.sample import NpzWriter


def chunk_files(run: str, step: int) -> list[str]:
    fs, root = storage.fs_path(storage.join(run, "eval", "samples", rundir.step_name(step)))
    try:
        names = sorted(p for p in fs.ls(root, detail=False) if p.endswith(".npz"))
    except FileNotFoundError:
        names = []
    if not names:
        raise FileNotFoundError(f"no kept samples for step {step} under {run}/eval/samples: score it with "
                                f"eval.keep_samples=true")
    return [storage.join(run, "eval", "samples", rundir.step_name(step), p.rsplit("/", 1)[-1]) for p in names]


def export(run: str, step: int, out: str) -> tuple:
    """Joins the kept chunks of `step` into `out`; returns the shape of arr_0."""
    urls = chunk_files(run, step)
    shapes = []
    for url in urls:  # the header needs the total count first: read each chunk's .npy headers only
        with np.load(io.BytesIO(storage.read_bytes(url))) as z:
            shapes.append((z["arr_0"].shape, "arr_1" in z.files))
    total = sum(s[0] for s, _ in shapes)
    writer = NpzWriter(out, (total, *shapes[0][0][1:]), shapes[0][1])
    for url in urls:
        with np.load(io.BytesIO(storage.read_bytes(url))) as z:
            writer.add_uint8(z["arr_0"], z["arr_1"] if "arr_1" in z.files else None)
    writer.close()
    return writer.shape


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evals.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--out", required=True, help="the .npz to write (any fsspec URL)")
    a = p.parse_args(argv)
    try:
        shape = export(a.run.rstrip("/"), a.step, a.out)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[export] {shape} uint8 -> {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
