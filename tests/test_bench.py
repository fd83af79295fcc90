"""The bench's own plumbing (no timings): the SMS outbox reader, --replicas, and the table reset."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import threading
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.pool import NullPool

from bench.run import (
    OPEN,
    OutboxReader,
    Run,
    main,
    open_region_people,
    parse_replicas,
    postgres_cpu_seconds,
    postgres_server_pid,
    reset_union_tables,
    table,
)
from server.union.sms import FileSmsSink, read_one_time_code
from server.union.storage.database import open_store
from server.union.storage.models import Base


def test_outbox_reader_finds_codes_written_by_the_unions_sink(tmp_path: Path) -> None:
    outbox = tmp_path / "sms-outbox.jsonl"
    reader = OutboxReader(outbox)
    assert reader.take("13800000001") is None  # no file yet

    sink = FileSmsSink(outbox)
    sink.send("13800000001", "【一键查卡】验证码 123456，5分钟内有效。请勿告诉他人。")
    sink.send("13800000002", "【一键查卡】验证码 654321，5分钟内有效。请勿告诉他人。")
    assert reader.take("13800000002") == "654321"
    assert reader.take("13800000001") == "123456"
    assert reader.take("13800000001") is None  # each code is handed out once

    sink.send("13800000001", "【一键查卡】验证码 000111，5分钟内有效。请勿告诉他人。")
    sink.send("13800000001", "【一键查卡】验证码 000222，5分钟内有效。请勿告诉他人。")
    assert reader.take("13800000001") == "000222" == read_one_time_code(outbox, "13800000001")


def test_outbox_reader_leaves_a_half_written_line_for_the_next_read(tmp_path: Path) -> None:
    outbox = tmp_path / "sms-outbox.jsonl"
    whole = '{"time": "t", "to": "13800000003", "text": "验证码 987654，5分钟内有效"}\n'
    outbox.write_text(whole[:20], encoding="utf-8")
    reader = OutboxReader(outbox)
    assert reader.take("13800000003") is None
    with outbox.open("a", encoding="utf-8") as handle:
        handle.write(whole[20:])
    assert asyncio.run(reader.wait_for("13800000003")) == "987654"


def test_replicas_take_a_comma_list() -> None:
    assert parse_replicas("1") == [1]
    assert parse_replicas("1,2") == [1, 2]
    for bad in ("", "0", "1,x", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_replicas(bad)


def test_several_replicas_need_postgresql() -> None:
    with pytest.raises(SystemExit, match="PostgreSQL"):
        main(["--replicas", "1,2"])


def test_help_warns_that_the_database_must_be_a_scratch_one(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "scratch" in capsys.readouterr().out


def test_people_are_drawn_from_open_regions() -> None:
    people = open_region_people(400, 50)
    assert len(people) == 50
    assert all(person.region_code in OPEN for person in people)


def test_reset_drops_the_unions_tables_and_nothing_else(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "union").mkdir(exist_ok=True)
    store = open_store(database_url)
    store.migrate()
    asyncio.run(store.close())
    engine = create_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE someone_elses (id INTEGER PRIMARY KEY)"))
        reset_union_tables(database_url)
        assert set(inspect(engine).get_table_names()) == {"someone_elses"}
        assert set(Base.metadata.tables)  # the union does have tables: the check above meant something

        # And the union migrates the emptied database again from scratch.
        store = open_store(database_url)
        store.migrate()
        asyncio.run(store.close())
        assert set(Base.metadata.tables) | {"alembic_version", "someone_elses"} == set(
            inspect(engine).get_table_names()
        )
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_local_postgresql_servers_cpu_is_attributed(database_url: str) -> None:
    postmaster = postgres_server_pid(database_url)
    assert postmaster is not None  # CI's server runs on this machine
    assert Path(f"/proc/{postmaster}/comm").read_text().startswith("postgres")
    before = postgres_cpu_seconds(postmaster)
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:  # work done by a backend that exits afterwards
            connection.execute(text("SELECT count(*) FROM generate_series(1, 3000000)")).scalar_one()
    finally:
        engine.dispose()
    assert postgres_cpu_seconds(postmaster) > before


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_postgresql_servers_cpu_never_goes_back_while_backends_come_and_go(database_url: str) -> None:
    """A backend reaped by the postmaster while /proc is read must be counted once: before its
    reaping as a live child, after it in the postmaster's children's time, never in neither."""
    postmaster = postgres_server_pid(database_url)
    assert postmaster is not None
    stop = threading.Event()

    def connect_and_leave() -> None:
        engine = create_engine(database_url, poolclass=NullPool)
        while not stop.is_set():
            with engine.connect() as connection:
                connection.execute(text("SELECT count(*) FROM generate_series(1, 300000)")).scalar_one()
        engine.dispose()

    churners = [threading.Thread(target=connect_and_leave) for _ in range(2)]
    for churner in churners:
        churner.start()
    try:
        readings = [postgres_cpu_seconds(postmaster) for _ in range(400)]
    finally:
        stop.set()
        for churner in churners:
            churner.join()
    went_back = [(a, b) for a, b in itertools.pairwise(readings) if b < a]
    assert not went_back
    assert readings[-1] > readings[0]  # the backends did work, and it was seen


def test_hold_only_needs_a_hold_count() -> None:
    with pytest.raises(SystemExit, match="--hold N"):
        main(["--hold-only"])


def test_cores_busy_is_the_rate_times_the_cpu_per_lookup() -> None:
    """50 lookups/s at 10 ms of CPU each (all processes) keep half a core busy."""
    run = Run("union (1 replica)", completed=100, seconds=2.0, cpu_ms_per_lookup={"union": 8.0, "banks": 2.0})
    assert run.cores_busy == 0.5
    assert run.summary()["cores_busy"] == 0.5
    header, line = table([run], None).splitlines()
    assert header.split()[7] == "cores"
    assert line.split()[7] == "0.50"
    assert Run("nothing measured").cores_busy == 0.0


def test_cores_busy_by_process_shows_which_process_is_the_bottleneck() -> None:
    """At 120 lookups/s a union spending 8.25 ms a lookup keeps 0.99 of a core busy, its single
    interpreter's limit, while the machine as a whole is far from its two cores."""
    run = Run(
        "union (1 replica)",
        completed=1200,
        seconds=10.0,
        cpu_ms_per_lookup={"union": 8.25, "banks": 1.8, "load": 1.5},
    )
    assert run.cores_busy_by_process == {"union": 0.99, "banks": 0.22, "load": 0.18}
    assert run.summary()["cores_busy_by_process"] == run.cores_busy_by_process
    assert run.cores_busy == 1.39
    line = table([run], None).splitlines()[1]
    assert "union 8.25 (0.99) banks 1.8 (0.22) load 1.5 (0.18)" in line
    assert Run("nothing measured").cores_busy_by_process == {}
