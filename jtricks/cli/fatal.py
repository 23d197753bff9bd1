"""One line instead of JAX's fatal abort, for the processes of a multi-process command.

When JAX's coordination service finds a fault it cannot recover from (two processes
started with the same ``--process-id``, a peer gone past JAX's heartbeat), every process
aborts from C++: a ``Terminating process because the JAX distributed service detected
fatal errors`` line, then a stack trace, written straight to file descriptor 2 and out
of Python's reach (the hook JAX offers for it cannot be called from Python in jaxlib
0.10). `one_line_fatal` routes the command's descriptor 2 through a small filter
process that passes everything through until that line, then prints one
``jtricks: error: ...`` line naming the cause and drops the trace. The process still
ends by the abort (status 134 in a shell).

New here; for the command only: a library never touches its caller's descriptors.
"""

from __future__ import annotations

import os
import subprocess
import sys

FILTER = r"""
import os, re, sys
FATAL = "Terminating process because the JAX distributed service detected fatal errors"
SERVICE = re.compile(r"^[EF]\d{4} [\d:.]+\s+\d+ (coordination_service\S*|client\.h):\d+\]")
DUP = re.compile(r"(\d+) unexpectedly tried to connect with a different incarnation")
out = os.fdopen(2, "w", errors="replace")


def cause(seen):
    dup = DUP.search(seen)
    if dup:
        return (f"two processes were started with --process-id {dup.group(1)}: give every "
                "process its own --process-id")
    if "heartbeat" in seen:
        return ("a process of this run stopped answering (JAX's heartbeat); the last "
                "checkpoint is intact: start every process again with --resume RUN_DIR")
    return "JAX's coordination service stopped the run: " + seen.split("absl::Status: ")[-1][:300]


held, explained = [], False  # the service's error lines, held back until we know more
for line in sys.stdin.buffer:
    text = line.decode(errors="replace")
    if held or SERVICE.match(text):
        held.append(text)
        if FATAL in text:
            out.write(f"jtricks: error: {cause(' '.join(held))}\n")
            out.flush()
            break  # the stack trace that follows is dropped
        if text.startswith("jtricks"):  # jtricks' own line explains what the service says
            explained = True
            out.write(text)
            out.flush()
        continue
    out.write(text)
    out.flush()
else:
    if not explained:
        out.writelines(held)
for _ in sys.stdin.buffer:
    pass
"""


def one_line_fatal() -> None:
    """Route this process's descriptor 2 through `FILTER` (once; the filter ends when
    the process closes its end, after writing what it was given)."""
    if os.environ.get("JTRICKS_FATAL_FILTER") == "0" or getattr(one_line_fatal, "on", False):
        return
    sys.stderr.flush()
    read, write = os.pipe()
    subprocess.Popen(
        [sys.executable, "-S", "-c", FILTER],
        stdin=read,
        close_fds=True,
        pass_fds=(2,),
        start_new_session=True,  # a terminal's Ctrl-C is for the command, not its filter
    )
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    one_line_fatal.on = True
