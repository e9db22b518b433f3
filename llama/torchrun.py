"""torchrun without its noise, for the examples and tools.

    python -m llama.torchrun --nproc_per_node 2 example_chat_completion.py --ckpt_dir ... --tokenizer_path ...
    llama-torchrun --nproc_per_node 2 -m llama.tools.chat --ckpt_dir ... --tokenizer_path ...

The same flags and the same processes as `torchrun` (this is torchrun's own launcher, run in
this process), with two differences:

- OMP_NUM_THREADS is set to 1 where it is unset, as torchrun does, but without torchrun's
  warning about it: on a CPU each rank sets its own threads (`--threads`; by default the
  physical cores shared between the ranks), so the value only matters outside torch.
- A rank that fails ends the run with one line and that rank's exit status (2 after an error
  the library has printed in one line; 1 after a Python traceback, printed above it), instead
  of torchrun's own traceback and failure report (about 40 lines, whatever the rank does:
  its exit status, `os._exit` or an error file change only the report's fields).
"""

import logging
import os
import signal
import sys
from typing import List, Optional

from torch.distributed import run as _torchrun
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

PROG = "llama.torchrun"
# the launcher's own lines about a failed rank, which the one line here replaces
_AGENT_LINES = ("failed (exitcode", "Sending process")


class _DropAgentLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_AGENT_LINES)


def describe(rank: int, exitcode: int) -> str:
    """What became of a failed rank, in words."""
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"rank {rank} was killed by {name}{hint}"
    return f"rank {rank} exited with status {exitcode}"


def status_of(exitcode: int) -> int:
    """The exit status for the whole run: the rank's own, or 128 + the signal, as a shell says."""
    return 128 - exitcode if exitcode < 0 else exitcode or 1


def main(argv: Optional[List[str]] = None) -> int:
    """Runs torchrun with `argv` (default: this command's arguments); returns the exit status."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = _torchrun.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_DropAgentLines())
    try:
        _torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        print(f"{PROG}: {describe(rank, failure.exitcode)}", file=sys.stderr)
        return status_of(failure.exitcode)
    except SignalException as e:
        print(f"{PROG}: stopped by {e.sigval.name}", file=sys.stderr)
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
