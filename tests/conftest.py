"""Test-wide settings.

The tests train tiny networks, for which one thread is as fast as two and does
not collapse when the machine is shared: OpenMP threads that wait on a busy core
can slow a run twentyfold. Set before torch is imported; subprocesses inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
