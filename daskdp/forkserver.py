"""What multiprocessing's forkserver imports (`daskdp.cluster.start_forkserver`): `daskdp.preload`,
one module deeper than the forkserver would import it.

CPython unmaps a 16 KiB chunk of its frame stack each time a call returns across the chunk's
start, and maps it again at the next call (python/cpython#142183; fixed in the 3.13 and 3.14
releases of March 2026, not in 3.11 or 3.12). The depth of the stack decides which loop meets
that boundary: imported by the forkserver directly, a loop of vLLM's import did, with twice the
page faults (335,000 against 170,000) and 2 s more of a core (10.5 s against 8.9 s), on the
path to every rank's start. From here none does. When Python, vLLM or transformers change,
compare the forkserver's minor faults (``/proc/PID/stat``) both ways.
"""

import daskdp.preload  # noqa: F401
