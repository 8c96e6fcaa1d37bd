"""Whether code runs while a module is being imported.

What a module does when it is imported (declare a task, add a plugin, build a timer) belongs to
the module, and stays as long as the module stays imported; what a test does is the test's, and
a test harness (``qtasks_testing``) takes it off when the test ends. The two are told apart by
the import system's frames below the code.
"""

from __future__ import annotations

import sys
from types import FrameType

_IMPORT_SYSTEM = frozenset(
    {"<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>"}
)


def importing() -> bool:
    """Whether a module is being imported by the calling thread: its body (or code it calls)
    is running under the import system."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename in _IMPORT_SYSTEM:
            return True
        frame = frame.f_back
    return False
