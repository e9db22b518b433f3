"""Runs a script (an example) and prints, as it exits, when each stage ended: seconds since
`$LAUNCH_T` (the launcher's start, set by benchmarks/startup.py), for the worker's start,
imports, `Llama.build`, the first answer and the process's end (for benchmarks/startup.py).

    LAUNCH_T=$(date +%s.%N) torchrun --nproc_per_node 1 benchmarks/timeline.py example_chat_completion.py ...
"""

import atexit
import json
import os
import runpy
import sys
import time

T0 = float(os.environ.get("LAUNCH_T") or time.time())
marks = {"worker started": time.time() - T0}

import torch  # noqa: E402,F401

marks["torch imported"] = time.time() - T0
from llama import Llama  # noqa: E402

marks["llama imported"] = time.time() - T0


def marked(name, fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        marks.setdefault(name, time.time() - T0)
        return out
    return wrapper


Llama.build = staticmethod(marked("built", Llama.build))
Llama.chat_completion = marked("answered", Llama.chat_completion)
Llama.text_completion = marked("answered", Llama.text_completion)
atexit.register(lambda: print("MARKS " + json.dumps(dict(marks, exiting=time.time() - T0)), file=sys.stderr,
                              flush=True))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
