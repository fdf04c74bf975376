"""Test-wide setup.

``TRITON_INTERPRET=1`` must be set before triton is imported (``triton.jit`` decides at
decoration time whether a kernel runs in the CPU interpreter), so it is set here, before any
test module imports fastpeft's kernels. CPU tensors still use the reference path unless a
test forces ``backend="triton"``.
"""

import os

import torch

if not torch.cuda.is_available():
    # On a CUDA machine the kernels run compiled (tests marked ``gpu``); the interpreter tests
    # then skip themselves.
    os.environ.setdefault("TRITON_INTERPRET", "1")
