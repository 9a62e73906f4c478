import json

import pytest

from bench import peers, rechoose
from search.config.study import FinalSpec


# over the suite's time budget (a whole search on the tiny landscape, about 10 s); the
# finished-run filter and the errors are covered by the tests below
@pytest.mark.slow
def test_kept_searches_are_rechosen_by_every_rule_and_the_default_repeats_what_final_chose(
    cache, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    kept = "kept"  # relative: the stages run inside each run's own folder
    assert peers.main(["--quick", "--methods", "c2f", "--keep", kept, "--json"]) == 0
    bench = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (run,) = bench["landscapes"]["tiny"]["methods"]["c2f"]["runs"]
    assert (tmp_path / "kept" / "tiny" / "c2f_0" / "study.toml").is_file()
    assert rechoose.main([kept, "--landscape", "tiny", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["runs"] == [0]
    assert set(res["rules"]) == {"robust", "model", "best", "smoothed"}
    # the default rule, re-made on the kept studies, is the choice search.final trained
    assert res["rules"][FinalSpec.choose]["runs"][0]["params"] == run["params"]
    # kept runs are run again, never read from the store (their folders must exist)
    assert peers.main(["--quick", "--methods", "c2f", "--keep", "again"]) == 0
    assert "[stored]" not in capsys.readouterr().out
    assert (tmp_path / "again" / "tiny" / "c2f_0" / "study.toml").is_file()
    for rule in res["rules"].values():
        assert 0 <= rule["runs"][0]["regret"] == rule["mean"] == rule["worst"]
    # --visited: the best the search trained, by the truth, is one it trained, and no
    # rule's choice (each a configuration it trained) can beat it
    assert rechoose.main([kept, "--landscape", "tiny", "--visited", "--json"]) == 0
    out = capsys.readouterr().out
    assert "best trained (truth)" in out
    seen = json.loads(out.strip().splitlines()[-1])["rules"]
    trained = rechoose.trained(tmp_path / "kept" / "tiny" / "c2f_0")
    assert seen[rechoose.VISITED]["runs"][0]["params"] in trained
    assert len(trained) > 1
    assert all(seen[rechoose.VISITED]["mean"] <= r["mean"] for r in seen.values())
    # and the best of them by a validation mean over fresh seeds
    assert "best trained (validation)" in out
    validated = seen[rechoose.VALIDATED]["runs"][0]["params"]
    truth = peers.Truth(peers.LANDSCAPES["tiny"], cache_dir=peers.CACHE, mapper=peers.serial_map)
    vals = truth.validation(trained)
    assert validated == trained[vals.index(max(vals))]


def test_only_finished_runs_of_the_variant_asked_for_are_read(tmp_path):
    def kept(name, *, finished):
        work = tmp_path / name
        work.mkdir()
        (work / "study.toml").write_text("")
        if finished:
            (work / "out" / "s" / "final").mkdir(parents=True)
            (work / "out" / "s" / "final" / "result.json").write_text("{}")
        return work

    done = [kept("c2f_3", finished=True), kept("c2f_12", finished=True)]
    kept("c2f_4", finished=False)  # killed before its final stage
    kept("c2f-robust-choice_3", finished=True)
    kept("tpe_3", finished=True)
    assert rechoose.kept_runs(tmp_path, "c2f") == [(3, done[0]), (12, done[1])]
    assert [run for run, _ in rechoose.kept_runs(tmp_path, "c2f-robust-choice")] == [3]


def test_a_folder_without_kept_runs_says_how_to_keep_them(tmp_path, cache):
    with pytest.raises(SystemExit, match="bench.peers --landscape tiny --methods c2f --keep"):
        rechoose.main([str(tmp_path), "--landscape", "tiny"])
    with pytest.raises(SystemExit, match="not a folder.*--keep DIR"):
        rechoose.main([str(tmp_path / "missing")])
