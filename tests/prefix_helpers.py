"""Shared by the Prefix Tuning tests: run peft's side of a comparison, or say why peft cannot.

peft is the oracle, but on some stacks peft itself cannot do a case: it raises (e.g. peft
0.21.2's SEQ_CLS prefix on transformers 5.24 looks for a ``past_key_values`` parameter), or
transformers ignores the prefix peft hands it (peft passes ``past_key_values=`` where
``generate()`` already holds ``cache=``, and transformers warns that it ignores the old name).
Then the test checks fastpeft's side against the reference path and skips with peft's own
message as the reason.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Callable, Optional, Tuple

# transformers' warning when a call carries both cache names: the deprecated one (peft's) is dropped
_IGNORED_CACHE = re.compile(r"Both `past_key_values` and `cache` are set")


def run_peft(fn: Callable[[], Any]) -> Tuple[Any, Optional[str]]:
    """``(fn(), None)``, or ``(None, reason)`` when peft cannot do this case on the installed stack."""
    import peft
    import transformers

    stack = f"peft {peft.__version__} on transformers {transformers.__version__}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = fn()
        except (ValueError, TypeError, AttributeError) as err:
            return None, f"{stack} cannot do this case: {type(err).__name__}: {err}"
    for w in caught:
        if _IGNORED_CACHE.search(str(w.message)):
            return None, f"{stack} cannot do this case (its prefix is dropped): {w.message}"
    return result, None
