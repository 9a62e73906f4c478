"""Every message a user can meet names the value and gives the fix that works, in one line
(exit 2 for a setting, 1 for a run that failed)."""

from __future__ import annotations

import re
import sys

import pytest

from search import coarse
from search.sweep.workers.storage import StorageURLError, check_storage


def no_module(monkeypatch, *names: str) -> None:
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # import fails, find_spec finds nothing


def test_a_postgresql_url_without_a_driver_says_which_scheme_to_write(
    qs_path, error_line, monkeypatch
):
    pytest.importorskip("psycopg2")
    no_module(monkeypatch, "psycopg")  # SQLAlchemy 2.1's default driver for postgresql://
    url = "postgresql://me:secret@127.0.0.1:1/db"
    assert coarse.main(["--study", qs_path, "--storage", url]) == 2
    line = error_line()
    assert line.startswith("error: storage 'postgresql://me:***@127.0.0.1:1/db' names no driver")
    assert line.endswith("psycopg2 is: start the URL with postgresql+psycopg2://"), line
    assert "secret" not in line


def test_without_any_postgresql_driver_the_fix_is_the_extra_and_the_scheme(monkeypatch):
    no_module(monkeypatch, "psycopg", "psycopg2")
    with pytest.raises(StorageURLError) as caught:
        check_storage("postgresql://me@db.example/x")
    assert str(caught.value).endswith(
        "pip install 'coarse2fine[postgres]' and start the URL with postgresql+psycopg2://"
    ), caught.value


def test_a_mysql_url_whose_driver_is_missing_says_what_to_install(
    qs_path, error_line, monkeypatch
):
    no_module(monkeypatch, "MySQLdb", "pymysql")
    assert coarse.main(["--study", qs_path, "--storage", "mysql://me@db.example/x"]) == 2
    line = error_line()
    assert "takes 'MySQLdb' for it, which is not installed" in line, line
    assert line.endswith("pip install pymysql and start the URL with mysql+pymysql://"), line
    assert coarse.main(["--study", qs_path, "--storage", "mysql+pymysql://me@db.example/x"]) == 2
    assert error_line().endswith(
        "needs the driver 'pymysql', which is not installed: pip install pymysql"
    )


def test_a_sqlite_file_in_a_directory_that_does_not_exist_is_refused_and_nothing_made(
    qs_path, error_line, tmp_path
):
    missing = tmp_path / "no" / "such" / "dir"
    for url in (f"sqlite:///{missing}/x.db", f"journal:///{missing}/x.log"):
        assert coarse.main(["--study", qs_path, "--storage", url]) == 2
        line = error_line()
        assert f"the directory {missing} does not exist; create it (mkdir -p {missing})" in line
        assert not (tmp_path / "no").exists()


def test_a_full_disk_while_preparing_the_data_names_the_file_the_disk_and_the_fix(
    qs_path, error_line, small_disk, monkeypatch
):
    disk = small_disk("cache", "256k")  # the digits' prepared arrays take about 480 kB
    monkeypatch.setenv("C2F_CACHE_DIR", str(disk))
    assert coarse.main(["--study", qs_path]) == 1
    line = error_line()
    assert re.match(
        f"error: cannot write the prepared data {disk}/[0-9a-f]{{16}}/train_X.npy:", line
    )
    assert f"the disk holding {disk} (mounted at {disk}) is full (0." in line, line
    assert "MB free, the data needs 0.5 MB)" in line, line
    assert "free some space or set C2F_CACHE_DIR to a directory on another disk" in line, line
    assert list(disk.iterdir()) == []  # no half-written cache left behind


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (
            ["--trials", "1e3"],
            "argument --trials: '1e3' is not a whole number in digits; write 1000",
        ),
        (["--workers", "2.5"], "argument --workers: '2.5' is not a whole number"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(qs_path, error_line, flags, words):
    with pytest.raises(SystemExit) as done:
        coarse.main(["--study", qs_path, *flags])
    assert done.value.code == 2
    assert error_line() == f"error: {words} (python -m search.coarse --help lists the flags)"
