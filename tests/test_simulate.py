import numpy as np
import pytest

from bktbayes.params import BKTParams, ParamTable
from bktbayes.simulate import simulate


def test_reproducible_and_canonical():
    a = simulate(BKTParams(), 50, skills=3, seed=11)
    b = simulate(BKTParams(), 50, skills=3, seed=11)
    c = simulate(BKTParams(), 50, skills=3, seed=12)
    assert a.equals(b)
    assert not a.equals(c)
    assert list(a.columns) == ["user_id", "skill", "correct", "order"]
    assert a["correct"].isin([0, 1]).all()
    assert not a.duplicated(["user_id", "order"]).any()


def test_first_response_rate_matches_the_model():
    # P(first correct) = p_init (1 - S) + (1 - p_init) G. With 20,000
    # sequences the binomial standard error is about 0.0035: 4 SE = 0.014.
    prm = BKTParams(p_init=0.4, p_transit=0.1, p_guess=0.25, p_slip=0.1)
    df = simulate(prm, 4000, skills=5, seed=3)
    first = df.sort_values("order").groupby(["user_id", "skill"]).head(1)
    expected = 0.4 * 0.9 + 0.6 * 0.25
    assert len(first) == 20_000
    assert first["correct"].mean() == pytest.approx(expected, abs=0.014)


def test_learning_raises_later_correctness_and_forgetting_lowers_it():
    # After many opportunities nearly everyone has learned (P(L) -> T / (T + F)),
    # so late correctness approaches (1 - S) without forgetting and stays lower
    # with it. 4 SE margins as above.
    learn = simulate(BKTParams(0.1, 0.3, 0.2, 0.1), 2000, skills=2, mean_length=40, seed=4)
    forget = simulate(
        BKTParams(0.1, 0.3, 0.2, 0.1, p_forget=0.3), 2000, skills=2, mean_length=40, seed=4
    )

    def late(df):
        pos = df.groupby(["user_id", "skill"]).cumcount()
        return df.loc[pos >= 20, "correct"].mean()

    assert late(learn) == pytest.approx(0.9 * 1.0 + 0.2 * 0.0, abs=0.02)
    p_l = 0.3 / 0.6
    assert late(forget) == pytest.approx(0.9 * p_l + 0.2 * (1 - p_l), abs=0.02)


def test_lengths_are_geometric_with_the_given_mean():
    df = simulate(BKTParams(), 2000, skills=4, mean_length=20, seed=5)
    lengths = df.groupby(["user_id", "skill"]).size()
    # 8,000 geometric lengths, sd ~19.5: SE of the mean ~0.22; 4 SE ~0.9.
    assert lengths.mean() == pytest.approx(20, abs=0.9)
    assert lengths.nunique() > 30


def test_per_skill_table_and_student_effects():
    table = ParamTable({"easy": BKTParams(0.8, 0.2, 0.3, 0.05), "hard": BKTParams(0.05, 0.05)})
    df, truth = simulate(table, 3000, seed=6, student_sd_init=1.0, return_truth=True)
    assert set(df["skill"]) == {"easy", "hard"}
    first = df.sort_values("order").groupby(["user_id", "skill"]).head(1)
    rate = first.groupby("skill")["correct"].mean()
    assert rate["easy"] > rate["hard"] + 0.3
    # 3,000 standard-normal draws: sd estimate within 4 SE (~0.05).
    assert truth.init_offset.std() == pytest.approx(1.0, abs=0.06)
    assert np.all(truth.transit_offset == 0)


def test_skills_per_user_subset():
    df = simulate(BKTParams(), 100, skills=10, skills_per_user=3, seed=1)
    assert (df.groupby("user_id")["skill"].nunique() == 3).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="skills_per_user"):
        simulate(BKTParams(), 10, skills=3, skills_per_user=5)
    with pytest.raises(ValueError, match="mean_length"):
        simulate(BKTParams(), 10, mean_length=0.5)
