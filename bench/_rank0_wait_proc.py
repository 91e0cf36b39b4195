"""One rank of bench/rank0_wait.py: rin_scale.train with its train_step and maybe_save timed.

    torchrun ... bench/_rank0_wait_proc.py OUT [trainer arguments]   # writes OUT-rankR.json

The trainer is whichever rin_scale is first on PYTHONPATH (the code before or after a change).
"""
import json
import os
import sys
import time


def main() -> int:
    from rin_scale import train

    out, argv = sys.argv[1], sys.argv[2:]
    times = {"step": [], "save": []}

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[key].append(time.perf_counter() - t0)
        return wrapper

    train.train_step = timed(train.train_step, "step")  # _train looks both up as module globals
    train.maybe_save = timed(train.maybe_save, "save")
    # what a save is made of, on each rank (looked up at call time; absent in older code is fine)
    from rin_scale import checkpoint, ema, tblog

    for key, owner, name in (("preview", getattr(train, "PreviewGrid", None), "grid"),
                             ("ema_gather", getattr(ema, "EMA", None), "full_state"),
                             ("deepspeed_save", checkpoint, "save_state"),
                             ("tb_flush", getattr(tblog, "TBLog", None), "flush"),
                             ("log_flush", getattr(train, "TrainLog", None), "flush"),
                             ("tb_image", getattr(tblog, "TBLog", None), "image"),
                             ("background_wait", getattr(checkpoint, "Background", None), "wait")):
        if owner is not None and hasattr(owner, name):
            times[key] = []
            setattr(owner, name, timed(getattr(owner, name), key))
    rc = train.main(argv)
    with open(f"{out}-rank{os.environ.get('RANK', '0')}.json", "w") as f:
        json.dump(times, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
