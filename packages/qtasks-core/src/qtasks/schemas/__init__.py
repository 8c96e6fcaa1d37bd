"""QTasks' ``qtasks.schemas`` path; only ``qtasks.schemas.test.TestConfig`` and
``qtasks.schemas.argmeta.ArgMeta`` are provided (the other schemas are qtasks' records and
messages: :mod:`qtasks.record`, :mod:`qtasks.messages`)."""
