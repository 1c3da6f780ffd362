"""The guard's wiring that needs no broker: the trading-day rollover."""

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from guardd.app import Guard
from guardd.config import load_config
from guardd.demo import DEMO_CONFIG, demo_config
from guardd.journal import read_journal

NY = ZoneInfo("America/New_York")


def test_midnight_new_york_then_daily_loss_and_drawdown_re_anchor(tmp_path: Path) -> None:
    cfg = demo_config(load_config(DEMO_CONFIG), ib_port=7497, state_dir=tmp_path)
    guard = Guard(cfg, fresh_start=True)
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
