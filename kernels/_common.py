"""Helpers shared by the kernel launchers (and by ``fastpeft.ops.backend``).

Imports neither triton nor the fastpeft package, so the backend choice can ask about the
interpreter where triton is not installed.
"""

from __future__ import annotations

import os

__all__ = ["interpreting"]


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``).

    This reads triton's own switch (triton reads the same variable when it decorates a kernel),
    not a fastpeft setting, so it stays an environment read: tests flip it to check the
    "no interpreter" errors.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")
