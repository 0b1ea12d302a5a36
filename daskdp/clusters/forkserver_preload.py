"""The forkserver's preload (`daskdp.clusters.forkserver`): it imports `daskdp.clusters.rank_imports`,
one module deeper than the forkserver would import it.

CPython unmaps a 16 KiB chunk of its frame stack each time a call returns across the chunk's
start, and maps it again at the next call (python/cpython#142183; fixed on the 3.13 and 3.14
branches, not in 3.11 or 3.12). The depth of the stack decides which loop meets that boundary:
imported by the forkserver directly, a hot loop of vLLM's import did, on the path to every
rank's start. Keep this extra module. When Python, vLLM or transformers change, compare the
forkserver's minor faults (``/proc/PID/stat``) both ways.
"""

import signal

# Started with SIGINT blocked (`daskdp.clusters.forkserver._sigint_held`): ignored from here on,
# by the forkserver and the ranks it forks; a Ctrl-C sent meanwhile is dropped with it.
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

import daskdp.clusters.rank_imports  # noqa: E402, F401
