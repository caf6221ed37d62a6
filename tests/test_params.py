import json
import math

import pytest

from bktbayes.params import (
    PARAM_NAMES,
    SCHEMA_VERSION,
    BKTParams,
    ParamFileError,
    ParamTable,
    SkillStats,
)


def test_defaults_are_the_seed_cards():
    p = BKTParams()
    assert p.as_tuple() == (0.3, 0.09, 0.2, 0.1, 0.0)


@pytest.mark.parametrize("field", ["p_init", "p_transit", "p_guess", "p_slip"])
@pytest.mark.parametrize("value", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_out_of_range_names_field_and_value(field, value):
    with pytest.raises(ValueError, match=field) as e:
        BKTParams(**{field: value})
    assert repr(float(value)) in str(e.value)


@pytest.mark.parametrize("value", [1.0, -0.01, math.nan])
def test_forget_range(value):
    with pytest.raises(ValueError, match="p_forget"):
        BKTParams(p_forget=value)
    assert BKTParams(p_forget=0.0).p_forget == 0.0


@pytest.mark.parametrize("value", [True, "0.3", None])
def test_non_numbers_rejected(value):
    with pytest.raises(ValueError, match="p_init"):
        BKTParams(p_init=value)


def test_guess_plus_slip_must_be_below_one():
    with pytest.raises(ValueError, match="p_guess \\+ p_slip"):
        BKTParams(p_guess=0.6, p_slip=0.4)
    BKTParams(p_guess=0.6, p_slip=0.39)


def test_transit_plus_forget_must_be_below_one():
    with pytest.raises(ValueError, match="p_transit \\+ p_forget"):
        BKTParams(p_transit=0.75, p_forget=0.25)
    BKTParams(p_transit=0.75, p_forget=0.24)


def _table():
    return ParamTable(
        {
            "fractions": BKTParams(0.2, 0.1, 0.25, 0.08, 0.01),
            "Absolute Value": BKTParams(0.5, 0.2, 0.1, 0.05),
        },
        BKTParams(0.35, 0.12, 0.2, 0.1),
        stats={
            "fractions": SkillStats(
                sd={"p_init": 0.02, "p_transit": 0.01},
                lower={"p_init": 0.17},
                upper={"p_init": 0.23},
                interval_prob=0.94,
                n_obs=1234,
                n_sequences=87,
            )
        },
        model="test",
        metadata={"config": {"pooling": "hierarchical"}, "forced": False},
    )


def test_json_round_trip(tmp_path):
    t = _table()
    path = t.to_json(tmp_path / "p.json")
    back = ParamTable.from_json(path)
    assert back == t
    assert back.version == t.version
    assert back.stats["fractions"].n_obs == 1234
    assert back["fractions"].p_forget == 0.01
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert set(doc) == {
        "schema_version",
        "model",
        "created",
        "default",
        "skills",
        "students",
        "items",
        "draws",
        "metadata",
    }


def test_version_hash_covers_metadata():
    a = _table()
    b = _table()
    b.created = a.created
    assert a.version == b.version
    b.metadata["forced"] = True
    assert a.version != b.version


def test_unseen_skill_uses_default_and_says_so():
    t = _table()
    p, known = t.lookup("never seen")
    assert p == t.default and known is False
    p, known = t.lookup("fractions")
    assert known is True and p.p_init == 0.2


def _doc():
    return _table().to_dict()


def _write(tmp_path, doc, raw=None):
    path = tmp_path / "p.json"
    path.write_text(raw if raw is not None else json.dumps(doc))
    return path


def test_rejects_unknown_schema_version(tmp_path):
    doc = _doc()
    doc["schema_version"] = 99
    with pytest.raises(ParamFileError, match="unknown schema_version 99"):
        ParamTable.from_json(_write(tmp_path, doc))


@pytest.mark.parametrize("field", ["model", "created", "default", "skills", "metadata"])
def test_rejects_missing_top_level_field(tmp_path, field):
    doc = _doc()
    del doc[field]
    with pytest.raises(ParamFileError, match=f"missing field.*{field}"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_rejects_extra_fields(tmp_path):
    doc = _doc()
    doc["surprise"] = 1
    with pytest.raises(ParamFileError, match="unknown field.*surprise"):
        ParamTable.from_json(_write(tmp_path, doc))
    doc = _doc()
    doc["skills"]["fractions"]["params"]["p_extra"] = 0.1
    with pytest.raises(ParamFileError, match="skill 'fractions'.params: unknown field.*p_extra"):
        ParamTable.from_json(_write(tmp_path, doc))
    doc = _doc()
    doc["skills"]["fractions"]["colour"] = "red"
    with pytest.raises(ParamFileError, match="skill 'fractions': unknown field.*colour"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_rejects_missing_param_field(tmp_path):
    doc = _doc()
    del doc["skills"]["Absolute Value"]["params"]["p_slip"]
    with pytest.raises(ParamFileError, match="skill 'Absolute Value'.params: missing.*p_slip"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_rejects_out_of_range_naming_skill_and_field(tmp_path):
    doc = _doc()
    doc["skills"]["fractions"]["params"]["p_guess"] = 1.2
    with pytest.raises(ParamFileError, match="skill 'fractions'.params.p_guess"):
        ParamTable.from_json(_write(tmp_path, doc))
    doc = _doc()
    doc["default"]["p_transit"] = 0
    with pytest.raises(ParamFileError, match="default.p_transit"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_rejects_non_finite(tmp_path):
    text = json.dumps(_doc()).replace('"p_init": 0.2', '"p_init": NaN', 1)
    with pytest.raises(ParamFileError, match="non-finite"):
        ParamTable.from_json(_write(tmp_path, None, raw=text))
    doc = _doc()
    doc["skills"]["fractions"]["sd"]["p_init"] = -1.0
    with pytest.raises(ParamFileError, match="skill 'fractions'.sd.p_init"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_rejects_bad_created_and_invalid_json(tmp_path):
    doc = _doc()
    doc["created"] = "yesterday"
    with pytest.raises(ParamFileError, match="ISO 8601"):
        ParamTable.from_json(_write(tmp_path, doc))
    with pytest.raises(ParamFileError, match="not valid JSON"):
        ParamTable.from_json(_write(tmp_path, None, raw="{"))


def test_guess_slip_rule_applies_in_files(tmp_path):
    doc = _doc()
    doc["skills"]["fractions"]["params"].update(p_guess=0.6, p_slip=0.5)
    with pytest.raises(ParamFileError, match="skill 'fractions'.params: p_guess \\+ p_slip"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_param_names_order():
    assert PARAM_NAMES == ("p_init", "p_transit", "p_guess", "p_slip", "p_forget")


def test_no_pickle_anywhere_in_the_package():
    import pathlib

    import bktbayes

    root = pathlib.Path(bktbayes.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "import pickle" not in text and "cloudpickle" not in text, f


def test_version_1_files_are_still_read(tmp_path):
    doc = _doc()
    doc["schema_version"] = 1
    del doc["students"], doc["draws"], doc["items"]
    t = ParamTable.from_json(_write(tmp_path, doc))
    assert t["fractions"].p_forget == 0.01 and t.students is None and t.n_draws == 0
    doc["students"] = None
    with pytest.raises(ParamFileError, match="unknown field.*students"):
        ParamTable.from_json(_write(tmp_path, doc))


def _v2_table():
    t = _table()
    draws = {
        "n": 3,
        "default": {k: [v] * 3 for k, v in t.default.to_dict().items()},
        "skills": {"fractions": {k: [v, v, v] for k, v in t["fractions"].to_dict().items()}},
    }
    draws["skills"]["fractions"]["p_init"] = [0.1, 0.2, 0.3]
    return ParamTable(
        dict(t),
        t.default,
        stats=t.stats,
        model="test",
        students={"init": {"u1": 0.5, "u2": -0.25}},
        draws=draws,
    )


def test_version_2_round_trip_with_students_and_draws(tmp_path):
    t = _v2_table()
    back = ParamTable.from_json(t.to_json(tmp_path / "p.json"))
    assert back == t and back.n_draws == 3
    assert back.draw_matrix("fractions")[0] == [0.1, 0.2, 0.3]
    assert back.draw_matrix("unseen")[0] == [0.35] * 3  # the default's draws
    # Student offsets act on the logit of p_init; unknown students get none.
    p = back.params_for("fractions", user="u1")
    assert p.p_init == pytest.approx(1 / (1 + math.exp(-(math.log(0.2 / 0.8) + 0.5))))
    assert back.params_for("fractions", user="stranger") == back["fractions"]


def test_version_2_rejects_bad_draws_and_offsets(tmp_path):
    doc = _v2_table().to_dict()
    doc["draws"]["skills"]["fractions"]["p_guess"] = [0.1, 0.2]
    with pytest.raises(
        ParamFileError, match=r"draws.skills\['fractions'\].p_guess: expected a list of 3"
    ):
        ParamTable.from_json(_write(tmp_path, doc))
    doc = _v2_table().to_dict()
    doc["draws"]["skills"]["fractions"]["p_guess"] = [0.1, 0.95, 0.1]
    with pytest.raises(ParamFileError, match="draw 1: p_guess \\+ p_slip"):
        ParamTable.from_json(_write(tmp_path, doc))
    doc = _v2_table().to_dict()
    doc["students"]["init"]["u1"] = "high"
    with pytest.raises(ParamFileError, match=r"students.init\['u1'\]"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_version_3_items_round_trip_and_fallback(tmp_path):
    t = _v2_table()
    t3 = ParamTable(
        dict(t),
        t.default,
        model="test",
        items={"fractions": {"p17": {"p_guess": 0.3, "p_slip": 0.05}}},
    )
    back = ParamTable.from_json(t3.to_json(tmp_path / "p.json"))
    assert back == t3 and back.item_params == {"fractions": {"p17": (0.3, 0.05)}}
    # A table's parsed items build another table (per-draw tables do this).
    assert (
        ParamTable(dict(back), back.default, items=back.item_params).item_params == back.item_params
    )
    p = back.params_for("fractions", item="p17")
    assert (p.p_guess, p.p_slip) == (0.3, 0.05)
    assert p.p_init == back["fractions"].p_init
    # An item the fit never saw (or no item) keeps the skill's guess and slip.
    assert back.params_for("fractions", item="p99") == back["fractions"]
    assert back.params_for("fractions") == back["fractions"]


def test_version_3_rejects_bad_items(tmp_path):
    t = _table()
    good = {"fractions": {"p17": {"p_guess": 0.3, "p_slip": 0.05}}}
    doc = ParamTable(dict(t), t.default, model="x", items=good).to_dict()
    doc["items"]["fractions"]["p17"]["p_slip"] = 0.8
    with pytest.raises(ParamFileError, match=r"items\['fractions'\]\['p17'\].*p_guess \+ p_slip"):
        ParamTable.from_json(_write(tmp_path, doc))
    doc["items"] = {"nope": {"p1": {"p_guess": 0.3, "p_slip": 0.05}}}
    with pytest.raises(ParamFileError, match="skill 'nope' is not in the table"):
        ParamTable.from_json(_write(tmp_path, doc))
    doc["items"] = {"fractions": {"p1": {"p_guess": 0.3}}}
    with pytest.raises(ParamFileError, match=r"\['p1'\]: missing field\(s\) \['p_slip'\]"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_version_2_files_are_still_read(tmp_path):
    doc = _v2_table().to_dict()
    doc["schema_version"] = 2
    del doc["items"]
    back = ParamTable.from_json(_write(tmp_path, doc))
    assert back.n_draws == 3 and back.item_params is None
    doc["items"] = None
    with pytest.raises(ParamFileError, match="unknown field.*items"):
        ParamTable.from_json(_write(tmp_path, doc))


def test_table_is_a_mapping_with_item_params():
    # ``items`` stays the Mapping method (an attribute of that name shadowed
    # it once); item-level parameters live in ``item_params``.
    t = ParamTable(
        {"a": BKTParams()}, items={"a": {"i1": {"p_guess": 0.3, "p_slip": 0.1}}}, model="x"
    )
    assert dict(t.items()) == {"a": BKTParams()}
    assert t.item_params == {"a": {"i1": (0.3, 0.1)}}


def _v4_doc():
    t = _v2_table()
    doc = ParamTable(
        dict(t),
        t.default,
        model="x",
        draws=t.draws,
        items={"fractions": {"p17": {"p_guess": 0.3, "p_slip": 0.05}}},
    ).to_dict()
    drawn = {"p_guess": [0.2, 0.3, 0.4], "p_slip": [0.1] * 3}
    doc["draws"]["items"] = {"fractions": {"p17": drawn}}
    return doc


def test_version_4_item_draws_round_trip(tmp_path):
    doc = _v4_doc()
    assert doc["schema_version"] == 4
    back = ParamTable.from_json(_write(tmp_path, doc))
    assert back.item_draws("fractions", "p17") == ([0.2, 0.3, 0.4], [0.1, 0.1, 0.1])
    assert back.item_draws("fractions", "p99") is None
    again = ParamTable.from_json(back.to_json(tmp_path / "again.json"))
    assert again.draws == back.draws and again.version == back.version
    # Version 3 had no item draws: such a file is refused, not half-read.
    doc["schema_version"] = 3
    with pytest.raises(ParamFileError, match="draws.items needs schema_version 4"):
        ParamTable.from_json(_write(tmp_path, doc))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(p_slip=[0.1, 0.1]), r"\['p17'\]\.p_slip: expected a list of 3"),
        (lambda d: d.update(p_slip=[0.1, 0.75, 0.1]), r"\['p17'\], draw 1: .*p_guess \+ p_slip"),
        (lambda d: d.update(p_guess=[0.2, "x", 0.3]), r"\['p17'\]\.p_guess: expected a list"),
        (lambda d: d.pop("p_guess"), r"\['p17'\]: missing field\(s\) \['p_guess'\]"),
    ],
)
def test_version_4_rejects_bad_item_draws(tmp_path, change, message):
    doc = _v4_doc()
    change(doc["draws"]["items"]["fractions"]["p17"])
    with pytest.raises(ParamFileError, match=message):
        ParamTable.from_json(_write(tmp_path, doc))


def test_version_4_item_draws_need_the_item(tmp_path):
    doc = _v4_doc()
    doc["draws"]["items"]["fractions"]["p18"] = {"p_guess": [0.2] * 3, "p_slip": [0.1] * 3}
    with pytest.raises(ParamFileError, match=r"\['p18'\]: item is not in the table's items"):
        ParamTable.from_json(_write(tmp_path, doc))
