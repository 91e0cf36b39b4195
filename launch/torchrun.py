"""torchrun, ending with the cause: `python -m launch.torchrun [torchrun options] -m rin_scale.train ...`

torchrun ends a failed job with a ChildFailedError traceback and its report table (26-35 lines),
which bury the rank's own one line ("[train] stopped: ... set X", a lease refusal, a hang). This
runs torchrun in-process with the same options, writes that report to a log file, and ends with
the first failed rank's line (torchrun's per-rank error file, which rin_scale.train writes on every
stop) after the path of the report. Its exit status is that rank's: a launcher can tell a
retryable failure (rin_scale.watchdog's statuses) from a stop.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
import typing as tp


def report_path() -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join(tempfile.gettempdir(), f"rin-torchrun-{stamp}-{os.getpid()}.log")


def cause(rank: int, failure) -> str:
    """The failed rank's own line, or what torchrun knows of its end (a signal, a traceback above)."""
    message = failure.message if isinstance(failure.message, str) else str(failure.message.get("message", ""))
    if os.path.isfile(failure.error_file) and message:
        return message
    how = (f"was killed by signal {-failure.exitcode} ({failure.signal_name()})" if failure.exitcode < 0
           else f"exited with status {failure.exitcode}")
    return f"[launch] rank {rank} (pid {failure.pid}, host {os.uname().nodename}) {how}; its own output is above"


def main(argv: tp.Optional[list[str]] = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        log = report_path()
        with open(log, "w") as f:
            f.write(e.format_msg() + "\n")
        print(f"[launch] the job ended: rank {rank} failed first; torchrun's report: {log}", file=sys.stderr)
        print(cause(rank, failure), file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
