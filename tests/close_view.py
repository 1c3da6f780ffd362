"""The close episode's world set by hand, for its unit tests: one position (`KEY`, ES on CME),
a `BookView` of what the executor would read off the Book (figure, our children's statuses,
fills) that a test moves along, and builders for the episode's inputs."""

from __future__ import annotations

from decimal import Decimal

from guardd.core.close import (
    Child,
    CloseEpisode,
    CloseSettings,
    Fill,
    Held,
    Observation,
    OrderReport,
    Round,
)
from guardd.core.events import ConId
from guardd.core.planner import (
    AccountId,
    ClosePolicy,
    ConfirmedPosition,
    PositionKey,
)

KEY = PositionKey(AccountId("DU1"), ConId(1))


OURS = 0


POLICY = ClosePolicy(max_rejects=None)


SETTINGS = CloseSettings(client_id=OURS, settle_s=5.0, lost_grace_s=2.0, overdue_s=30.0)


def held(quantity: int, updated: float, sec_type: str = "FUT") -> Held:
    position = ConfirmedPosition(
        key=KEY,
        symbol="ES",
        sec_type=sec_type,
        exchange="CME",
        currency="USD",
        quantity=Decimal(quantity),
        price=100.0,
        fx_rate=1.0,
    )
    return Held(position, updated)


def fill(exec_id: str, quantity: int, ts: float, *, client: int = 7, order_id: int = 5) -> Fill:
    return Fill(exec_id, client, order_id, 0, KEY, Decimal(quantity), ts, True)


class BookView:
    """What the executor would read off the Book, set by hand."""

    def __init__(self, position: int, now: float = 100.0) -> None:
        self.now = now
        self.generation = 1
        self.synced_since: float | None = 0.0
        self.executions_complete = True
        self.position = position
        self.updated = 0.0
        self.orders: dict[int, OrderReport] = {}
        self.fills: list[Fill] = []
        self.foreign_buying: dict[PositionKey, Decimal] = {}
        self.foreign_selling: dict[PositionKey, Decimal] = {}
        self.listed_asked: float | None = None  # a positions download asked afresh, answered

    def obs(self) -> Observation:
        return Observation(
            now=self.now,
            generation=self.generation,
            synced_since=self.synced_since,
            executions_complete=self.executions_complete,
            positions={KEY: held(self.position, self.updated)},
            orders=dict(self.orders),
            fills=list(self.fills),
            foreign_buying=dict(self.foreign_buying),
            foreign_selling=dict(self.foreign_selling),
            positions_listed_asked=self.listed_asked,
        )

    def figure(self, quantity: int) -> None:
        self.position, self.updated = quantity, self.now

    def download(self, asked: float, quantity: int) -> None:
        """The answer to a positions download asked for at `asked` says `quantity`."""
        self.figure(quantity)
        self.listed_asked = asked

    def status(self, order_id: int, status: str, filled: int) -> None:
        self.orders[order_id] = OrderReport(order_id, 1000 + order_id, status, Decimal(filled))


def send_all(episode: CloseEpisode, plan: Round, view: BookView, first_id: int) -> list[int]:
    ids = []
    for n, order in enumerate(plan.orders):
        episode.add_child(order, first_id + n, view.generation, view.now)
        view.status(first_id + n, "Submitted", 0)
        ids.append(first_id + n)
    return ids


def child_of(episode: CloseEpisode, order_id: int) -> Child:
    child = episode.child_by_order_id(order_id)
    assert child is not None
    return child


def kinds(plan: Round) -> list[str]:
    return [r.kind for r in plan.records]
