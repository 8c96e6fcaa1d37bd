"""The name clash with the unrelated ``qtasks`` distribution on the package index.

That distribution (the QTasks 1.7 project) ships the same ``qtasks`` import package and
``qtasks`` console script as ``qtasks-core``. Installed in one environment, whichever came last
overwrote the other's files, and the leftovers of one (its subpackages, e.g. a ``qtasks/plugins/``
directory that shadows ``qtasks/plugins.py``) break the other. This module has a name the other
distribution does not use, so it survives such a mix to say what happened.
"""

from __future__ import annotations

import importlib.metadata

FIX = "pip uninstall -y qtasks qtasks-core && pip install qtasks-core"


def other_qtasks() -> str | None:
    """A message when the distribution named ``qtasks`` is installed here too, else ``None``."""
    try:
        other = importlib.metadata.distribution("qtasks")
    except importlib.metadata.PackageNotFoundError:
        return None
    return (
        f"the distribution 'qtasks' {other.version} (the unrelated QTasks project) is installed "
        "in this environment next to qtasks-core; both ship the 'qtasks' package and command, "
        f"so one overwrote the other's files. Keep one: {FIX}"
    )
