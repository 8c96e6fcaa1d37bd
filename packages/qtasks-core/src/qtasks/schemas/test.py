"""``from qtasks.schemas.test import TestConfig`` (QTasks' path), for :mod:`qtasks.tests`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TestConfig:
    """Which components a QTasks test case keeps. QTasks replaced each ``False`` one with a stub
    that did nothing; :mod:`qtasks.tests` supports the full set only (see there why)."""

    __test__ = False  # not a pytest test class

    worker: bool = False
    broker: bool = False
    storage: bool = False
    global_config: bool = False
    plugins: bool = False

    @classmethod
    def full(cls) -> TestConfig:
        return cls(worker=True, broker=True, storage=True, global_config=True, plugins=True)

    @classmethod
    def only_worker(cls, plugins: bool = False) -> TestConfig:
        return cls(worker=True, plugins=plugins)

    @classmethod
    def only_broker(cls, plugins: bool = False) -> TestConfig:
        return cls(broker=True, plugins=plugins)

    @classmethod
    def full_broker(cls) -> TestConfig:
        return cls(broker=True, storage=True, global_config=True, plugins=True)

    @property
    def is_full(self) -> bool:
        return all((self.worker, self.broker, self.storage, self.global_config, self.plugins))
