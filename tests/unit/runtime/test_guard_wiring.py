"""The guard's wiring that needs no broker: the trading-day rollover."""

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from guardd.config import load_config
from guardd.demo import DEMO_CONFIG, demo_config
from guardd.runtime.guard import Guard
from guardd.runtime.startup import Restored
from guardd.state.journal import Journal, read_journal
from guardd.state.latch import Armed

NY = ZoneInfo("America/New_York")


def test_midnight_new_york_then_daily_loss_and_drawdown_re_anchor(tmp_path: Path) -> None:
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    guard = Guard.open(cfg, fresh_start=True)
    evening = datetime(2026, 11, 23, 23, 59, tzinfo=NY).timestamp()
    guard._roll_day(evening)
    guard.book.set_start_of_day(1_000_000.0)

    guard._roll_day(evening + 30)  # same day: nothing moves
    assert guard.book.start_of_day == 1_000_000.0

    guard._roll_day(evening + 90)  # past midnight in New York
    assert guard.book.start_of_day is None
    days = [r["day"] for r in read_journal(cfg.journal_path) if r["kind"] == "trading_day_started"]
    assert days == ["2026-11-24"]
    guard.journal.close()


def test_refusal_summary_unjournaled_then_carried_with_its_first_refusal_time(
    tmp_path: Path,
) -> None:
    # Arrange: three refused HTTP commands of one kind at t=100 (the first journaled in full,
    # two counted); the journal then cannot take the interval's summary (as on a full disk)
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    now = [100.0]
    guard = Guard.open(cfg, fresh_start=True, clock=lambda: now[0])
    interval = cfg.control.refusal_interval_s
    refused = {"channel": "http", "error": "AuthError", "status": 401, "principal": None}
    for _ in range(3):
        guard.audit(refused)
    guard.journal.close()
    now[0] = 100.0 + interval
    assert guard.flush_refusals() is None  # not journaled: carried into the next summary

    # Act: the journal works again; the next summary is due
    guard.journal = Journal(cfg.journal_path, clock=lambda: now[0])
    now[0] = 100.0 + 2 * interval
    summary = guard.flush_refusals()

    # Assert: the two counted refusals, still dated from the first of them
    guard.journal.close()
    assert summary is not None
    records = [r for r in read_journal(cfg.journal_path) if r["kind"] == "command_refused"]
    aggregated = [
        r for r in read_journal(cfg.journal_path) if r["kind"] == "command_refusals_aggregated"
    ]
    assert len(records) == 1
    assert [(r["since"], r["total"], r["counts"]) for r in aggregated] == [
        (100.0, 2, {"http:AuthError:401": 2})
    ]


def test_reload_of_a_file_nested_too_deep_then_refused_and_journaled(tmp_path: Path) -> None:
    # Arrange: a running config, and a file TOML cannot parse without exhausting the stack
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    guard = Guard.open(cfg, fresh_start=True)
    path = tmp_path / "guardd.toml"
    path.write_text("a = " + "[" * 100_000)

    # Act: SIGHUP's handler
    applied = guard.reload(lambda: load_config(path), str(path))

    # Assert: refused, accounted for, and the guard keeps its config
    guard.journal.close()
    refused = [r for r in read_journal(cfg.journal_path) if r["kind"] == "config_reload_refused"]
    assert applied is False
    assert guard.cfg is cfg
    assert len(refused) == 1 and "nested too deeply" in refused[0]["error"]


def test_guard_made_from_restored_state_then_its_constructor_touches_no_file(
    tmp_path: Path,
) -> None:
    # Arrange: a state directory that does not exist, and the state Guard.open would have read
    state_dir = tmp_path / "state"
    demo = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    cfg = demo.model_copy(update={"state_dir": state_dir})
    armed = Armed("fresh_start", "operator", "operator", since=1.0)
    restored = Restored(armed, armed, 0, frozenset(), ())
    journal = Journal(tmp_path / "elsewhere" / "journal.jsonl")

    # Act
    guard = Guard(cfg, restored, journal)

    # Assert: wired, and nothing created, read or written
    assert guard.engine.state == "ARMED"
    assert not state_dir.exists()
    assert [r["kind"] for r in read_journal(journal.path)] == []
    journal.close()
