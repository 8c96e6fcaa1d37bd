"""QTasks' ``qtasks.schemas`` path; only ``qtasks.schemas.test.TestConfig`` is provided (the
other schemas are qtasks' records and messages: :mod:`qtasks.record`, :mod:`qtasks.messages`)."""
