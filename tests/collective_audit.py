"""`torchrun ... tests/collective_audit.py [trainer args]`: the trainer with torch.distributed's
collectives wrapped. Every call appends {name, devices, caller} to $AUDIT_DIR/rank-R.jsonl, where
devices are the device types of the tensors it was given (empty for the object collectives, which
pick their own device). NCCL can only reduce tensors on the GPU: a CPU tensor in a collective of a
CUDA run is the first-step crash this audit exists to catch (tests/test_collectives.py)."""
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

NAMES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
         "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all_single", "barrier",
         "broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _caller() -> str:
    """The innermost frame of the project (rin_scale, launch, evals) or else of DeepSpeed."""
    frames = traceback.extract_stack()[:-2]
    for keys in (("rin_scale", "launch", "evals"), ("deepspeed",)):
        for f in reversed(frames):
            if any(f"/{k}/" in f.filename for k in keys):
                return f"{f.filename.split('/site-packages/')[-1]}:{f.lineno}"
    return "?"


def _wrap(name, fn, out):
    def audited(*args, **kwargs):
        devices = sorted({t.device.type for t in _tensors((args, kwargs))})
        out.write(json.dumps({"name": name, "devices": devices, "caller": _caller()}) + "\n")
        out.flush()
        return fn(*args, **kwargs)
    return audited


def install(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    out = open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.jsonl"), "a")
    for name in NAMES:
        fn = getattr(c10d, name, None)
        if fn is not None:
            wrapped = _wrap(name, fn, out)
            setattr(c10d, name, wrapped)  # torch's own object collectives call these names
            setattr(dist, name, wrapped)  # DeepSpeed and the project call torch.distributed.NAME


if __name__ == "__main__":
    install(os.environ["AUDIT_DIR"])
    from rin_scale.train import main

    sys.exit(main(sys.argv[1:]))
