"""A router module, as QTasks' example apps have one (examples/sync/router_tasks.py)."""

from qtasks import SyncRouter

router = SyncRouter()


@router.task(description="Test router task.")
def router_test():
    return "router_test"
