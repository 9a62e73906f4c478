"""SQLite storage: reads never wait for a writer, writes wait for the lock and then go through."""

from __future__ import annotations

import sqlite3
import threading
import time

import optuna
import pytest

from search.sweep.workers.loop import take
from search.sweep.workers.storage import ResilientStorage, SQLiteStorage, make_storage


@pytest.fixture
def sqlite_study(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.enqueue_trial({"x": 1.0})
    return tmp_path / "s.db", storage, study


def _hold_write_lock(db, seconds: float, held: threading.Event) -> None:
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN IMMEDIATE")
    held.set()
    time.sleep(seconds)
    con.execute("COMMIT")
    con.close()


@pytest.mark.parametrize("pickled", [False, True], ids=["fresh", "unpickled"])
def test_sqlite_settings(sqlite_study, pickled):
    import pickle

    db, storage, _ = sqlite_study
    if pickled:  # unpickling builds a new engine: it must get the same settings
        storage = pickle.loads(pickle.dumps(storage))
    assert isinstance(storage, ResilientStorage) and isinstance(storage.backend, SQLiteStorage)
    with storage.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 60_000


@pytest.mark.parametrize("pickled", [False, True], ids=["fresh", "unpickled"])
def test_reads_do_not_wait_for_a_writer_and_writes_do(sqlite_study, pickled):
    import pickle

    db, storage, study = sqlite_study
    if pickled:  # an unpickled storage keeps the same transaction rules
        storage = pickle.loads(pickle.dumps(storage))
        study = optuna.load_study(study_name="s", storage=storage)
    held = threading.Event()
    holder = threading.Thread(target=_hold_write_lock, args=(db, 1.0, held))
    holder.start()
    held.wait()
    t0 = time.perf_counter()
    trials = study.get_trials(deepcopy=False)  # a read: no write lock needed
    read_s = time.perf_counter() - t0
    assert len(trials) == 1 and trials[0].state == optuna.trial.TrialState.WAITING
    # A write: waits for the holder, then succeeds.
    trial_id = take(storage, storage.get_study_id_from_name("s"))
    write_s = time.perf_counter() - t0
    holder.join()
    assert trial_id == trials[0]._trial_id
    assert storage.get_trial(trial_id).state == optuna.trial.TrialState.RUNNING
    # A read that waited for the writer would take its full second.
    assert read_s < 0.7, f"a read waited {read_s:.2f} s for the writer"
    assert write_s >= 0.8, "the write should have waited for the lock"


def test_fast_report_matches_optuna(sqlite_study, tmp_path):
    """The upsert behind trial.report stores what Optuna's own implementation stores."""
    import math

    from search.sweep.workers import storage as storage_mod

    assert storage_mod._FAST_REPORT, "the fast path is off: Optuna's tables changed"
    _, storage, study = sqlite_study
    reference = optuna.create_study(
        storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'ref.db'}"), study_name="r"
    )
    values = [(0, 0.25), (1, float("inf")), (2, float("-inf")), (3, float("nan"))]
    for s in (study, reference):
        trial = s.ask()
        for step, v in values:
            trial.report(v, step)
        # trial.report ignores a step reported twice; the storage overwrites it.
        s._storage.set_trial_intermediate_value(trial._trial_id, 0, 0.5)
    ours = study.get_trials()[-1].intermediate_values
    theirs = reference.get_trials()[-1].intermediate_values
    assert ours.keys() == theirs.keys() == {0, 1, 2, 3}
    assert ours[0] == theirs[0] == 0.5
    assert ours[1] == math.inf and ours[2] == -math.inf and math.isnan(ours[3])

    study.tell(trial := study.ask(), 1.0)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_intermediate_value(trial._trial_id, 0, 0.1)
    with pytest.raises(KeyError):
        storage.set_trial_intermediate_value(10_000, 0, 0.1)


def test_processes_that_open_a_new_storage_at_once_all_get_it(any_storage_url):
    """Workers that start together on a new database (a compose file's, two machines'
    first commands) each create Optuna's tables and record its schema's version: none
    fails on a table, type or row another one has just made, and the schema is recorded
    once."""
    barrier = threading.Barrier(6)
    opened: list[ResilientStorage] = []
    failed: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            opened.append(make_storage(any_storage_url))
        except BaseException as exc:  # noqa: BLE001 - the test's verdict
            failed.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failed, failed
    assert len(opened) == 6
    optuna.create_study(storage=opened[0], study_name="together")
    assert [s.study_name for s in optuna.study.get_all_study_summaries(opened[5])] == ["together"]
    if not any_storage_url.startswith("journal"):
        import sqlalchemy

        engine = sqlalchemy.create_engine(any_storage_url)
        try:
            with engine.connect() as conn:
                for table in ("version_info", "alembic_version"):
                    rows = conn.exec_driver_sql(f"SELECT COUNT(*) FROM {table}").scalar()
                    assert rows == 1, table
        finally:
            engine.dispose()
