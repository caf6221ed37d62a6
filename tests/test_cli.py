import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from bktbayes.cli import main
from bktbayes.data import load_events
from bktbayes.params import BKTParams, ParamTable
from bktbayes.tracing import replay


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "bktbayes.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_help_explains_itself():
    out = run_cli("--help")
    assert out.returncode == 0
    for word in ("simulate", "score", "params", "demo"):
        assert word in out.stdout
    sub = run_cli("score", "--help")
    assert "--params" in sub.stdout and "Parquet" in sub.stdout


def test_simulate_then_score_round_trip(tmp_path, capsys):
    sim = tmp_path / "sim.parquet"
    assert (
        main(["simulate", "--users", "60", "--skills", "3", "--seed", "2", "--out", str(sim)]) == 0
    )
    params = tmp_path / "p.json"
    ParamTable({"s0": BKTParams(0.2, 0.2, 0.2, 0.1)}, BKTParams()).to_json(params)
    out = tmp_path / "scored.csv"
    assert main(["score", str(sim), "--params", str(params), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 skill(s) not in the parameter file" in text
    scored = pd.read_csv(out)
    mastery = pd.read_csv(tmp_path / "scored.mastery.csv")
    events = load_events(sim)
    res = replay(events, ParamTable.from_json(params))
    assert scored["p_mastery"].to_numpy() == pytest.approx(res.p_mastery, abs=1e-12)
    assert len(mastery) == len(res.mastery["p_mastery"])
    assert set(mastery.columns) >= {"user_id", "skill", "p_mastery", "attempts", "status"}


def test_bad_input_exits_nonzero_without_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"user_id": [1], "skill": ["a"], "correct": ["yes"], "order": [0]}).to_csv(
        bad, index=False
    )
    out = run_cli("score", str(bad), "--out", str(tmp_path / "o.csv"))
    assert out.returncode == 2
    assert "column 'correct'" in out.stderr and "Traceback" not in out.stderr

    out = run_cli("score", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o.csv"))
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr

    badp = tmp_path / "p.json"
    badp.write_text('{"schema_version": 7}')
    out = run_cli("score", str(bad), "--params", str(badp), "--out", str(tmp_path / "o.csv"))
    assert out.returncode == 2 and "schema_version 7" in out.stderr

    out = run_cli(
        "simulate", "--out", str(tmp_path / "s.csv"), "--p-guess", "0.7", "--p-slip", "0.4"
    )
    assert out.returncode == 2 and "p_guess + p_slip" in out.stderr


def test_params_default_and_check(tmp_path, capsys):
    p = tmp_path / "p.json"
    assert main(["params", "default", "--out", str(p), "--skill", "fractions"]) == 0
    t = ParamTable.from_json(p)
    assert t["fractions"] == BKTParams() and t.default == BKTParams()
    assert main(["params", "check", str(p)]) == 0
    assert "valid" in capsys.readouterr().out


@pytest.mark.slow
def test_partition_and_score_on_dask(tmp_path):
    from bktbayes.cli import BUNDLED_DATA

    assert main(["partition", str(BUNDLED_DATA), str(tmp_path / "parts"), "--partitions", "4"]) == 0
    assert (
        main(["score", str(tmp_path / "parts"), "--out", str(tmp_path / "m"), "--dask", "local"])
        == 0
    )
    got = pd.read_parquet(tmp_path / "m")
    ref = replay(load_events(BUNDLED_DATA), ParamTable.seed_defaults()).mastery
    assert len(got) == len(ref["p_mastery"])
    assert np.isclose(np.sort(got["p_mastery"].to_numpy()), np.sort(ref["p_mastery"])).all()
    # A file instead of a partitioned directory is a clear error.
    assert main(["score", str(BUNDLED_DATA), "--out", str(tmp_path / "x"), "--dask", "local"]) == 2
