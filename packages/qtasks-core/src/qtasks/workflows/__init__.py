"""Workflows: chain, group, chord and map of tasks, continued by the workers.

Build one from signatures (``task.s(...)``) with :func:`chain`, :func:`group` and
:func:`chord`; run it with ``await app.run_workflow(wf)``. Each step is enqueued by the worker
that finished the step before, as part of settling it (see ``docs/workflows.md``), so a
workflow goes on when every client is gone.
"""

from qtasks.workflows.canvas import (
    Chain,
    Chord,
    ChordHeader,
    Group,
    Node,
    Signature,
    chain,
    chord,
    group,
)
from qtasks.workflows.runtime import SyncWorkflow, Workflow

__all__ = [
    "Chain",
    "Chord",
    "ChordHeader",
    "Group",
    "Node",
    "Signature",
    "SyncWorkflow",
    "Workflow",
    "chain",
    "chord",
    "group",
]
