import json

import pytest

from bench import train_speed


def test_json_is_the_last_line_with_a_floor_per_network(capsys, monkeypatch):
    # Without torch the reference is null; the figures themselves are not asserted.
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    assert train_speed.main(["--n", "300", "--repeats", "1", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    rows = json.loads(last)["networks"]
    assert [r["network"] for r in rows] == [name for name, _, _ in train_speed.NETS]
    for r in rows:
        assert set(r) == {"network", "ours_s", "floor_s", "torch_s"}
        assert r["ours_s"] > 0 and r["floor_s"] > 0 and r["torch_s"] is None


def test_eval_share_times_both_ways_for_every_network(capsys):
    # Figures vary with the machine: the test asserts the table's shape, not its numbers.
    assert train_speed.main(["--eval-share", "--n", "600", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any('train_metrics = "full", train_eval_size = 600' in line for line in out)
    rows = json.loads(out[-1])["eval_share"]
    assert [r["network"] for r in rows] == [name for name, _, _ in train_speed.NETS]
    for r in rows:
        for way in train_speed.EVAL_WAYS:
            assert 0 < r[f"{way}_eval_s"] < r[f"{way}_s"]
            # One run each: the median share is that run's. Each figure is rounded to 4
            # places, which moves a ratio of times of a few hundredths of a second by
            # more than 1e-3: the tolerance allows for it.
            share = r[f"{way}_eval_s"] / r[f"{way}_s"]
            rounding = 1e-4 + 1e-4 / r[f"{way}_s"]
            assert r[f"{way}_share"] == pytest.approx(share, abs=1e-3 + rounding)
