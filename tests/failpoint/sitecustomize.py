"""Fault injection for tests/fault_harness.py: nothing in histosynth itself knows about it.

The harness puts this folder on PYTHONPATH, so Python imports this module at start-up in every
process of a harnessed run (torchrun's workers too). With HISTOSYNTH_FAILPOINT=N set, the process
SIGKILLs itself at its N-th rename of a temporary file onto its target -- inside an atomic write,
after the temporary file is written and fsynced, before it replaces the target: the worst moment.
Without the variable this module does nothing.
"""

import os
import re
import signal

_N = int(os.environ.get("HISTOSYNTH_FAILPOINT") or 0)

if _N > 0:
    _real_replace = os.replace
    _temp = re.compile(r"^\..+\.\d+\.tmp$")          # histosynth.checkpoint's temporary names
    _seen = [0]

    def _replace(src, dst, *args, **kwargs):
        if _temp.match(os.path.basename(os.fspath(src))):
            _seen[0] += 1
            if _seen[0] == _N:
                os.kill(os.getpid(), signal.SIGKILL)
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
