import json

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
