"""``components.takes_keyword``: the one answer to "does this component's method take a keyword
added to the protocol since" (the worker's ``ended=`` and ``wanted=``, flow's ``waiter=`` and
``limits=``, steps' ``fence=``)."""

from __future__ import annotations

from typing import Any

from qtasks.components import takes_keyword


class Older:
    def consume(self, *, prefetch: int) -> None: ...


class Newer:
    def consume(self, *, prefetch: int, wanted: Any = None) -> None: ...


class Forwarding:
    def consume(self, **kwargs: Any) -> None: ...


class PositionalOnly:
    def consume(self, wanted: Any = None, /) -> None: ...


class Unreadable:
    """A callable whose signature cannot be read (as some builtins' cannot)."""

    @property
    def __signature__(self) -> Any:
        raise ValueError("no signature")

    def __call__(self, *args: Any, **kwargs: Any) -> None: ...


class NoSignature:
    consume = Unreadable()  # nothing to read: taken to follow the current protocol


def test_a_keyword_is_taken_by_name_or_through_kwargs_never_positional_only() -> None:
    assert not takes_keyword(Older(), "consume", "wanted")
    assert takes_keyword(Newer(), "consume", "wanted")
    assert takes_keyword(Forwarding(), "consume", "wanted")
    # A positional-only parameter of that name cannot receive ``wanted=``.
    assert not takes_keyword(PositionalOnly(), "consume", "wanted")
    assert takes_keyword(NoSignature(), "consume", "wanted")
    assert takes_keyword(Older(), "no_such_method", "wanted")


def test_the_answer_is_read_once_per_class() -> None:
    class Later:
        def consume(self, *, prefetch: int) -> None: ...

    assert not takes_keyword(Later(), "consume", "ended")
    # The class changes after the read (another signature: the point of the test).
    Later.consume = Newer.consume  # type: ignore[method-assign,assignment]
    assert not takes_keyword(Later(), "consume", "ended")
    assert takes_keyword(Later(), "consume", "wanted")  # another keyword: read now
