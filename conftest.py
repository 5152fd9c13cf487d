"""Test-suite settings that must be in place before any notebook kernel starts.

Fast mode (MINISD_FAST=1) shrinks every training loop and sample count so that each notebook runs
in seconds; nbval's kernels inherit this environment. MINISD_DEVICE is left alone, so the suite
runs on CUDA where torch sees a GPU (or where you set MINISD_DEVICE=cuda) and on the CPU elsewhere.
"""

import os

os.environ.setdefault("MINISD_FAST", "1")
