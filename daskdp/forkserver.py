"""What multiprocessing's forkserver imports (`daskdp.cluster.start_forkserver`): `daskdp.preload`,
one module deeper than the forkserver would import it.

CPython unmaps a 16 KiB chunk of its frame stack each time a call returns across the chunk's
start, and maps it again at the next call (python/cpython#142183; fixed on the 3.13 and 3.14
branches in March 2026, not in 3.11 or 3.12). The depth of the stack decides which loop meets
that boundary. Imported by the forkserver directly, a loop of vLLM's import did: 335,000 page
faults and 10.5 s of a core, on the path to every rank's start; from here 170,000 and 8.9 s, as
at most depths tried. When Python, vLLM or transformers change, compare the forkserver's minor
faults (``/proc/PID/stat``) both ways.
"""

import daskdp.preload  # noqa: F401
