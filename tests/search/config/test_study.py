import tomllib
from pathlib import Path

import pytest

from search.config.study import StudyDefinitionError, load_spec, parse_spec
from tests.search.conftest import dump_toml

STUDIES = sorted((Path(__file__).resolve().parents[3] / "studies").glob("*.toml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_studies_are_valid(path):
    spec = load_spec(path)
    assert spec.name == path.stem
    assert "l2_lambda" in spec.search
    assert spec.storage_url().endswith(f"studies/{spec.name}.db")


def test_shipped_studies_include_the_dd2424_settings():
    names = {p.stem for p in STUDIES}
    assert {"quickstart", "cifar10_2layer", "cifar10_3layer_bn", "cifar10_9layer_bn"} <= names
    nine = load_spec(STUDIES[[p.stem for p in STUDIES].index("cifar10_9layer_bn")])
    assert nine.network.hidden == (50, 30, 20, 20, 10, 10, 10, 10) and nine.network.batch_norm
    assert nine.search["l2_lambda"].bounds == (1e-5, 1e-1) and nine.search["l2_lambda"].log
    assert nine.train_config("coarse", {"l2_lambda": 1e-3}).batch_size == 100


BASE = {"name": "t", "search": {"l2_lambda": [1e-5, 1e-1]}}


@pytest.mark.parametrize(
    "change,field,words",
    [
        ({"colour": 1}, "top level", "unknown keys ['colour']"),
        ({"search": {"l2_lambda": [1e-1, 1e-5]}}, "search.l2_lambda", "low must be < high"),
        ({"search": {"l2_lambda": [0, 1e-1]}}, "search.l2_lambda", "bounds > 0"),
        ({"search": {"l2_lambda": [1e-5]}}, "search.l2_lambda", "[low, high]"),
        ({"search": {"batch_size": [1, 2]}}, "search.batch_size", "{int = [1, 2], log = true}"),
        ({"search": {"colour": [1, 2]}}, "search.colour", "searchable: ["),
        ({"data": {"name": "mnist"}}, "data.name", "must be one of"),
        ({"data": {"nme": "digits"}}, "data", "unknown keys ['nme']"),
        ({"network": {"hidden": [50, -1]}}, "network.hidden", "positive integers"),
        ({"network": {"batch_norm": "yes"}}, "network.batch_norm", "bool"),
        ({"training": {"eta_mn": 1}}, "training.eta_mn", "did you mean 'eta_min'"),
        ({"training": {"l2_lambda": 0.1}}, "search", "both searched and fixed"),
        ({"training": {"schedule": "cosine"}}, "training.schedule", "schedule must be one of"),
        ({"optuna": {"pruner": "early"}}, "optuna.pruner", "must be one of"),
        ({"coarse": {"trials": 0}}, "coarse.trials", ">= 1"),
        ({"name": "a b"}, "name", "letters, digits"),
        ({"coarse": {"trials": True}}, "coarse.trials", "an integer"),
        ({"data": {"n_val": 0}}, "data.n_val", ">= 1"),
        ({"data": {"name": "cifar10", "split": "batch9"}}, "data.split", "must be one of"),
        ({"data": {"split": "all"}}, "data.split", "cifar10 only"),
        ({"network": {"hidden": []}}, "network.hidden", "non-empty"),
        ({"network": {"sigma": -1.0}}, "network.sigma", "> 0"),
        ({"network": {"bn_alpha": 2.0}}, "network.bn_alpha", "[0, 1)"),
        ({"final": {"holdout": -5}}, "final.holdout", ">= 0"),
        ({"optuna": {"sampler": "grid"}}, "optuna.sampler", "must be one of"),
        ({"optuna": {"heartbeat_interval": 0}}, "optuna.heartbeat_interval", ">= 1"),
        (
            {"optuna": {"grace_period": 9, "heartbeat_interval": 5}},
            "optuna.grace_period",
            "twice",
        ),
        ({"optuna": {"warmup_cycles": -1.0}}, "optuna.warmup_cycles", ">= 0"),
        ({"optuna": {"n_startup_trials": -1}}, "optuna.n_startup_trials", ">= 0"),
        ({"optuna": {"storage": "nonsense"}}, "optuna.storage", "storage URL"),
        ({"optuna": {"heartbeat_interval": 60}}, "optuna.grace_period", "2 x 60 = 120 s"),
        # A range only partly valid: eta_max below the fixed eta_min would fail trials.
        (
            {"training": {"eta_min": 0.01}, "search": {"eta_max": [1e-3, 1.0]}},
            "training",
            "eta_max=0.001",
        ),
        ({"search": {"eta": [1e-3, 1e-1]}}, "search.eta", "cyclical schedule does not use eta"),
        (
            {"training": {"schedule": "step", "eta": 0.1}, "search": {"eta_max": [1e-3, 1e-1]}},
            "search.eta_max",
            "uses eta, not eta_max",
        ),
    ],
)
def test_bad_files_name_the_field(change, field, words):
    raw = {**BASE, **change}
    with pytest.raises(StudyDefinitionError) as info:
        parse_spec(raw, "studies/bad.toml")
    msg = str(info.value)
    assert "studies/bad.toml" in msg and f"[{field}]" in msg and words in msg


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(StudyDefinitionError, match="no such study file"):
        load_spec(tmp_path / "nope.toml")
    bad = tmp_path / "b.toml"
    bad.write_text("name = \n")
    with pytest.raises(StudyDefinitionError, match="not valid TOML"):
        load_spec(bad)


def test_stage_overrides_and_storage_default(quick_study):
    spec = load_spec(quick_study(fine={"trials": 4, "training": {"n_cycles": 3}}))
    assert spec.train_config("coarse", {"l2_lambda": 1e-3}).n_cycles == 2
    assert spec.train_config("fine", {"l2_lambda": 1e-3}).n_cycles == 3
    assert spec.train_config("final", {"l2_lambda": 1e-3}).n_cycles == 4
    assert spec.storage_url() == f"sqlite:///{spec.base_dir / 'qs.db'}"
    assert spec.with_overrides(storage="sqlite:///x.db").storage_url() == "sqlite:///x.db"
    assert tomllib.loads(Path(spec.path).read_text())["name"] == "qs"


def test_storage_urls_and_journal_files_are_accepted():
    for url in ("sqlite:///x.db", "mysql+pymysql://u@h/d", "journal:///x.log", "runs/x.log"):
        assert parse_spec({**BASE, "optuna": {"storage": url}}).optuna.storage == url


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "change,field,words",
    [
        # Let through before: every trial then failed, or trained something else than asked.
        ({"training": {"batch_size": 50.5}}, "training.batch_size", "must be an integer"),
        ({"training": {"n_s": NAN}}, "training.n_s", "must be an integer"),
        ({"training": {"n_cycles": 1.5}}, "training.n_cycles", "must be an integer"),
        ({"training": {"train_eval_size": 0}}, "training.train_eval_size", ">= 1"),
        ({"training": {"train_eval_size": -5}}, "training.train_eval_size", ">= 1"),
        ({"training": {"eta_min": NAN}}, "training.eta_min", "finite"),
        ({"training": {"rho": INF}}, "training.rho", "finite"),
        ({"training": {"seed": -1}}, "training.seed", ">= 0"),
        ({"training": {"schedule": 3}}, "training.schedule", "must be a string"),
        ({"fine": {"training": {"n_cycles": 2.0}}}, "fine.training.n_cycles", "integer"),
        ({"final": {"training": {"batch_size": NAN}}}, "final.training.batch_size", "integer"),
        ({"optuna": {"warmup_cycles": NAN}}, "optuna.warmup_cycles", "finite number"),
        ({"fine": {"margin": NAN}}, "fine.margin", "finite number"),
        ({"fine": {"margin": INF}}, "fine.margin", "finite"),
        ({"fine": {"top_k": 0}}, "fine.top_k", ">= 1"),
        ({"fine": {"trials": 10**9}}, "fine.trials", "<= 10,000"),
        ({"coarse": {"trials": 10**9}}, "coarse.trials", "<= 10,000"),
        ({"coarse": {"trials": 2.0}}, "coarse.trials", "must be an integer"),
        ({"network": {"sigma": NAN}}, "network.sigma", "finite"),
        ({"network": {"sigma": 0.0}}, "network.sigma", "> 0"),
        ({"fine": {"margin": -1}}, "fine.margin", ">= 0 decades"),
        ({"network": {"bn_alpha": NAN}}, "network.bn_alpha", "finite"),
        ({"data": {"n_val": 1.5}}, "data.n_val", "or a fraction of the data in (0, 1)"),
        ({"data": {"n_val": NAN}}, "data.n_val", "finite"),
        ({"final": {"holdout": 2.5}}, "final.holdout", "or a fraction of them in (0, 1)"),
        ({"optuna": {"seed": -3}}, "optuna.seed", ">= 0"),
        ({"optuna": {"workers": 0}}, "optuna.workers", ">= 1"),
        ({"optuna": {"workers": 1.5}}, "optuna.workers", "integer"),
        ({"optuna": {"grace_period": INF}}, "optuna.grace_period", "integer"),
        ({"optuna": {"storage": "sqlite:///"}}, "optuna.storage", "in-memory"),
        ({"optuna": {"storage": "sqlite:///:memory:"}}, "optuna.storage", "keeps nothing"),
        ({"optuna": {"storage": "sqlite://"}}, "optuna.storage", "in-memory"),
        ({"name": "x" * 300}, "name", "at most 100 characters"),
        ({"name": "caf\u00e9"}, "name", "letters, digits"),
    ],
)
def test_every_number_is_checked_for_type_and_range(change, field, words):
    raw = {**BASE, **change}
    with pytest.raises(StudyDefinitionError) as info:
        parse_spec(raw, "studies/bad.toml")
    msg = str(info.value)
    assert msg.startswith(f"studies/bad.toml: [{field}] ") and words in msg, msg


def test_unreadable_study_files_are_named(tmp_path):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(StudyDefinitionError, match=r"latin1.toml: \[file\] is not UTF-8 text"):
        load_spec(latin1)
    with pytest.raises(StudyDefinitionError, match=r"\[file\] is a directory"):
        load_spec(tmp_path)
    with pytest.raises(StudyDefinitionError, match="c2f init"):
        load_spec(tmp_path / "studies" / "quickstart.toml")


@pytest.mark.parametrize(
    "change,field,words",
    [
        ({"training": {"eta": 0.05}}, "training.eta", "not read by the cyclical schedule"),
        ({"training": {"n_epochs": 20}}, "training.n_epochs", 'set schedule = "step" or "c'),
        ({"training": {"schedule": "step", "eta_max": 0.1}}, "training.eta_max", "cyclical"),
        ({"training": {"schedule": "constant", "decay": 0.9}}, "training.decay", '= "step"'),
        ({"fine": {"training": {"n_epochs": 5}}}, "fine.training.n_epochs", "cyclical"),
        ({"network": {"sigma": 0.01}}, "network.sigma", 'only with init = "sigma" (init is "he'),
        ({"search": {"sigma": [1e-3, 1e-1]}}, "search.sigma", 'set [network] init = "sigma"'),
    ],
)
def test_settings_nothing_reads_are_refused_with_the_fix(tmp_path, change, field, words):
    """A fixed setting that the built-in network and its schedule never read (eta with the
    cyclical schedule, sigma without init = "sigma") would pass unseen, the student
    believing it trained with it: the study file is refused, naming the field and the
    fix."""
    raw = {**BASE, **change}
    raw["network"] = {"init": "he", **raw.get("network", {})}
    parse_spec(raw, "studies/t.toml")  # each is a valid document; only load_spec refuses
    path = tmp_path / "t.toml"
    path.write_text(dump_toml(raw))
    with pytest.raises(StudyDefinitionError) as info:
        load_spec(path)
    msg = str(info.value)
    assert f"[{field}]" in msg and words in msg, msg


@pytest.mark.parametrize(
    "change",
    [
        # final trains with a step schedule, which reads the eta of [training]
        {"training": {"eta": 0.05}, "final": {"training": {"schedule": "step"}}},
        # the schedule is searched: each value reads its own fields
        {"training": {"eta": 0.05}, "search": {"schedule": {"choice": ["cyclical", "step"]}}},
        {"network": {"init": "sigma", "sigma": 0.01}},
        {"network": {"sigma": 0.01}, "search": {"init": {"choice": ["he", "sigma"]}}},
        # a user's own training code is given every [training] value
        {"training": {"eta": 0.05}, "model": {"train": "mine.py:train"}},
    ],
)
def test_settings_some_stage_or_choice_reads_are_accepted(tmp_path, change):
    raw = {**BASE, **change}
    if "search" in change:
        raw["search"] = {**BASE["search"], **change["search"]}
    (tmp_path / "mine.py").write_text("def train(params, data):\n    return 0.5\n")
    path = tmp_path / "t.toml"
    path.write_text(dump_toml(raw))
    load_spec(path)
