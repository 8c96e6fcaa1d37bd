"""The sync test app of QTasks (tests/apps/app_sync.py), ported."""

from _backend import BROKER_URL, CONFIG

from qtasks import QueueTasks

app = QueueTasks(name="QueueTasks", broker_url=BROKER_URL, config=CONFIG)
app.config.delete_finished_tasks = True


@app.task(name="test")
def sample_task(id: int):
    # The task's work...
    result = f"User {id} saved"
    return result


@app.task(name="error_task")
def error_zero():
    result = 1 / 0
    print(result)


@app.task(name="slow")  # not in QTasks' app: a task that outlasts a short wait
def slow():
    import time

    time.sleep(0.5)


if __name__ == "__main__":
    app.run_forever()
