"""Command line: ``bktbayes simulate | score | params | demo``.

Bad input exits with status 2 and one clear message, no traceback; a bug
still shows its traceback (it is not bad input).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .params import BKTInputError, BKTParams, ParamTable

__all__ = ["main"]

_DESCRIPTION = """\
Bayesian Knowledge Tracing.

Commands:
  simulate   draw synthetic responses from BKT parameters
  score      replay an event history through the tracer with a parameter file:
             per-event predictions and the final mastery per (user, skill);
             --dask replays a user-partitioned Parquet directory on a cluster
  partition  split an events file into user-partitioned Parquet files
  params     write or check a parameter JSON file
  fit        fit a model with NUTS: posterior, parameters JSON, diagnostics, plots
  evaluate   cross-validated AUC / RMSE / log loss, folds by student
  compare    PSIS-LOO comparison of fitted models
  serve      the HTTP mastery service over a database (FastAPI on uvicorn)
  recalculate  rebuild a database's mastery rows from its event log
  demo       the quick-start job on the bundled ASSISTments 2009 data

Run 'bktbayes COMMAND --help' for the options of a command.
"""

BUNDLED_DATA = Path(__file__).resolve().parent.parent / "data" / "assistments2009.parquet"


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=None, leave=False)


def _out_paths(out: Path, mastery_out: Path | None) -> tuple[Path, Path]:
    if mastery_out is not None:
        return out, mastery_out
    name = out.name
    for ext in (".csv.gz", ".parquet", ".pq", ".csv"):
        if name.lower().endswith(ext):
            stem = name[: -len(ext)]
            return out, out.with_name(f"{stem}.mastery{ext}")
    raise BKTInputError(f"--out {out}: use a .csv, .csv.gz or .parquet file name")


def _load_params(path: str | None) -> ParamTable:
    if path is None:
        return ParamTable.seed_defaults()
    return ParamTable.from_json(path)


def _summary(mastery, unknown: list, label: str) -> str:
    import numpy as np

    p = mastery["p_mastery"]
    status = mastery["status"]
    lines = [
        f"{label}: {len(p):,} (user, skill) rows, {int(mastery['attempts'].sum()):,} responses"
    ]
    for s in ("mastered", "in_progress", "needs_focus"):
        k = int((status == s).sum())
        lines.append(f"  {s:<12} {k:>9,}  ({k / max(len(p), 1):6.1%})")
    lines.append(f"  mean P(mastery) {float(np.mean(p)):.3f}, median {float(np.median(p)):.3f}")
    if unknown:
        shown = ", ".join(map(str, unknown[:5]))
        lines.append(
            f"  {len(unknown)} skill(s) not in the parameter file used the population "
            f"default: {shown}{' ...' if len(unknown) > 5 else ''}"
        )
    return "\n".join(lines)


def _cmd_score(args: argparse.Namespace) -> int:
    if args.dask:
        return _score_dask(args)
    from .data import load_events, save_events
    from .tracing import replay

    out, mastery_out = _out_paths(Path(args.out), args.mastery_out and Path(args.mastery_out))
    table = _load_params(args.params)
    bar = _progress(3, "score")
    events = load_events(
        args.events,
        format=args.format,
        drop_missing_skill=args.drop_missing_skill,
        duplicates="keep_first" if args.keep_first_duplicate else "error",
    )
    bar.update()
    t0 = time.perf_counter()
    res = replay(events, table)
    dt = time.perf_counter() - t0
    bar.update()
    scored = events.copy()
    scored["p_correct"] = res.p_correct
    scored["p_mastery"] = res.p_mastery
    save_events(scored, out)
    save_events(res.mastery_frame(), mastery_out)
    bar.update()
    bar.close()
    print(_summary(res.mastery, res.unknown_skills, f"scored {args.events}"))
    print(f"  replay: {len(events):,} events in {dt:.3f} s; wrote {out} and {mastery_out}")
    return 0


def _score_dask(args: argparse.Namespace) -> int:
    from .recalc import replay_partitioned

    src = Path(args.events)
    if not src.is_dir():
        raise BKTInputError(
            f"--dask: {src} is not a directory of user-partitioned Parquet files "
            "(make one with 'bktbayes partition EVENTS DIR')"
        )
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise BKTInputError(f"--out {out} exists and is not empty")
    t0 = time.perf_counter()
    replay_partitioned(src, _load_params(args.params), out, client=args.dask)
    n = len(list(out.glob("*.parquet")))
    print(
        f"replayed {src} on Dask ({args.dask}) in {time.perf_counter() - t0:.1f} s: "
        f"{n} mastery files in {out}"
    )
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    from .data import load_events
    from .recalc import write_partitioned

    events = load_events(args.events, format=args.format)
    files = write_partitioned(events, args.out, args.partitions)
    print(f"wrote {len(events):,} events as {len(files)} user-partitioned files in {args.out}")
    return 0


_MODEL_HELP = (
    "model: 'hierarchical' (default) or 'none' (no pooling), optionally with "
    "'+forgetting', '+students' (student effects on p_init) or '+students2' (on "
    "p_init and p_transit) and '+items' (item-level guess/slip), e.g. hierarchical+forgetting"
)


def _model_from_spec(spec: str):
    from .models import BKTModel

    kw: dict = {}
    parts = [p.strip() for p in spec.split("+") if p.strip()]
    if not parts:
        raise BKTInputError(f"--model {spec!r}: empty")
    for p in parts:
        if p in ("hierarchical", "none"):
            kw["pooling"] = p
        elif p == "forgetting":
            kw["forgetting"] = True
        elif p == "students":
            kw["student_effects"] = "init"
        elif p == "students2":
            kw["student_effects"] = "init+transit"
        elif p == "items":
            kw["item_effects"] = True
        else:
            raise BKTInputError(f"--model {spec!r}: unknown part {p!r} ({_MODEL_HELP})")
    return lambda: BKTModel(**kw)


def _cmd_fit(args: argparse.Namespace) -> int:
    import json

    from .data import load_events
    from .export import ExportError
    from .plots import plot_forest

    make = _model_from_spec(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    events = load_events(args.events, format=args.format)
    model = make()
    print(f"fitting {model!r} on {len(events):,} responses", file=sys.stderr)
    _fit_quietly(model, events, args)
    d = model.diagnostics
    model.save(out / "fit")
    try:
        table = model.export_params(n_draws=args.export_draws)
        forced = False
    except ExportError as e:
        if not args.force:
            print(f"bktbayes fit: diagnostics fail, parameters not exported: {e}", file=sys.stderr)
        table = model.export_params(n_draws=args.export_draws, force=True) if args.force else None
        forced = args.force
    if table is not None:
        table.to_json(out / "params.json")
    (out / "diagnostics.json").write_text(json.dumps(_jsonable(d), indent=2) + "\n")
    for name in ("p_init", "p_transit", "p_guess", "p_slip"):
        plot_forest(model.idata, name).savefig(out / f"forest_{name}.png", dpi=110)
    print(
        f"max R-hat {d['max_rhat']:.3f}, min bulk ESS {d['min_ess_bulk']:.0f}, divergences "
        f"{d['divergences']}; wrote {out}/fit, diagnostics.json, forest_*.png"
        + (f", params.json{' (forced)' if forced else ''}" if table is not None else "")
    )
    return 0 if table is not None else 1


def _fit_quietly(model, events, args: argparse.Namespace) -> None:
    """Fit with the command's sampler settings; the diagnostics are printed by
    the caller, so the model's own convergence warning is not repeated."""
    import warnings

    from .models import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(
            events,
            draws=args.draws,
            tune=args.tune,
            chains=args.chains,
            random_seed=args.seed,
            progressbar=sys.stderr.isatty(),
        )


def _jsonable(x):
    from .params import jsonable

    return jsonable(x)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_events
    from .evaluate import cross_validate

    events = load_events(args.events, format=args.format)
    res = cross_validate(
        events,
        _model_from_spec(args.model),
        k=args.folds,
        method=args.method,
        fit_kwargs={
            "draws": args.draws,
            "tune": args.tune,
            "chains": args.chains,
            "random_seed": args.seed,
        },
        n_draws=args.export_draws,
        progress=lambda m: print(m, file=sys.stderr),
    )
    print(res.folds.to_string(index=False))
    print(res.summary.T.to_string())
    if args.out:
        res.folds.to_csv(args.out, index=False)
        print(f"wrote {args.out}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import warnings

    from .evaluate import compare_models
    from .models import BKTModel

    fits = {}
    for d in args.dirs:
        path = Path(d) / "fit" if (Path(d) / "fit").exists() else Path(d)
        fits[Path(d).name] = BKTModel.load(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = compare_models(fits)
    print(table.to_string())
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return 0


def _api_key(args: argparse.Namespace) -> str | None:
    import os

    key = args.api_key or os.environ.get("BKTBAYES_API_KEY") or None
    if key is not None and len(key) < 16:
        raise BKTInputError("the API key must have at least 16 characters")
    return key


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .service import create_app
    from .store import MasteryStore

    key = _api_key(args)
    store = MasteryStore(args.db, _load_params(args.params))  # validates, creates the schema
    print(
        f"serving {store.params!r} from {store.url.render_as_string(hide_password=True)} on "
        f"http://{args.host}:{args.port} (writes {'need X-API-Key' if key else 'are open'}; "
        f"OpenAPI at /docs)",
        file=sys.stderr,
    )
    common = {"host": args.host, "port": args.port, "log_level": args.log_level}
    if args.workers > 1:
        # Each worker process opens its own store from the environment.
        import os

        os.environ["BKTBAYES_DB"] = str(args.db)
        os.environ.pop("BKTBAYES_PARAMS", None)
        if args.params:
            os.environ["BKTBAYES_PARAMS"] = str(Path(args.params).resolve())
        if key:
            os.environ["BKTBAYES_API_KEY"] = key
        os.environ["BKTBAYES_FAST_WRITES"] = "1" if args.fast_writes else "0"
        store.close()
        uvicorn.run(
            "bktbayes.service:app_from_env",
            factory=True,
            workers=args.workers,
            access_log=False,
            **common,
        )
        return 0
    app = create_app(store, api_key=key, fast_writes=args.fast_writes)
    uvicorn.run(app, access_log=False, **common)
    return 0


def _cmd_recalculate(args: argparse.Namespace) -> int:
    from .recalc import retain_heap
    from .store import MasteryStore

    retain_heap()

    store = MasteryStore(args.db, _load_params(args.params))
    res = store.recalculate(users=args.user or None, bulk=args.bulk)
    print(
        f"recalculated {res.n_rows:,} mastery rows from {res.n_events:,} events with "
        f"parameters {res.param_version[:12]} in {res.seconds:.2f} s (read {res.bulk_read} "
        f"{res.seconds_read:.2f} s, replay {res.seconds_replay:.2f} s, write "
        f"{res.seconds_write:.2f} s)"
    )
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .data import save_events
    from .simulate import simulate

    if args.params:
        table = ParamTable.from_json(args.params)
        df = simulate(
            table,
            args.users,
            skills_per_user=args.skills_per_user,
            mean_length=args.mean_length,
            max_length=args.max_length,
            student_sd_init=args.student_sd_init,
            student_sd_transit=args.student_sd_transit,
            seed=args.seed,
        )
    else:
        try:
            base = BKTParams(args.p_init, args.p_transit, args.p_guess, args.p_slip, args.p_forget)
        except ValueError as e:
            raise BKTInputError(str(e)) from None
        df = simulate(
            base,
            args.users,
            skills=args.skills,
            skills_per_user=args.skills_per_user,
            mean_length=args.mean_length,
            max_length=args.max_length,
            student_sd_init=args.student_sd_init,
            student_sd_transit=args.student_sd_transit,
            seed=args.seed,
        )
    save_events(df, args.out)
    print(
        f"simulated {len(df):,} responses of {df['user_id'].nunique():,} students on "
        f"{df['skill'].nunique()} skills -> {args.out}"
    )
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    if args.action == "default":
        if not args.out:
            raise BKTInputError("params default: --out PATH is required")
        try:
            d = BKTParams(args.p_init, args.p_transit, args.p_guess, args.p_slip, args.p_forget)
        except ValueError as e:
            raise BKTInputError(str(e)) from None
        skills = {s: d for s in (args.skill or [])}
        ParamTable(skills, d, model="seed-defaults").to_json(args.out)
        print(f"wrote {args.out}")
        return 0
    if not args.path:
        raise BKTInputError("params check: give the PATH of a parameter file")
    t = ParamTable.from_json(args.path)
    print(
        f"{args.path}: valid, schema {t.to_dict()['schema_version']}, model {t.model!r}, "
        f"{len(t)} skills, version {t.version[:16]}"
    )
    print(f"  default for unseen skills: {t.default}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .data import load_events
    from .simulate import simulate
    from .tracing import BayesianKnowledgeTracer, mastery_status, replay

    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    print("== 1. simulate: 500 students, 10 skills, seed defaults, seed 2026")
    sim = simulate(BKTParams(), 500, skills=10, seed=2026)
    res = replay(sim, BKTParams())
    auc = _auc(sim["correct"].to_numpy(), res.p_correct)
    print(f"   {len(sim):,} responses; tracer AUC on its own simulation {auc:.3f}")

    print(f"== 2. score the bundled data ({args.events}) with the seed card's defaults")
    events = load_events(args.events)
    table = ParamTable(model="seed-defaults")
    t0 = time.perf_counter()
    res = replay(events, table)
    dt = time.perf_counter() - t0
    auc = _auc(events["correct"].to_numpy(), res.p_correct)
    print(
        f"   {len(events):,} responses, {events['user_id'].nunique():,} students, "
        f"{events['skill'].nunique()} skills; replay {dt * 1e3:.0f} ms; "
        f"one-step-ahead AUC {auc:.3f} (default parameters, no fit)"
    )
    print(_summary(res.mastery, [], "   mastery"))
    mf = res.mastery_frame()
    by_skill = mf.groupby("skill")["p_mastery"].agg(["mean", "size"]).sort_values("mean")
    print("   skills with the lowest mean P(mastery):")
    for skill, row in by_skill.head(3).iterrows():
        print(f"     {skill:<45} {row['mean']:.3f}  ({int(row['size'])} students)")
    mf.to_csv(outdir / "mastery_seed_defaults.csv", index=False)
    table.to_json(outdir / "params_seed_defaults.json")

    if args.fit:
        _demo_fit(args, events, outdir, auc)
        table = ParamTable.from_json(outdir / "params.json")

    print("== 4. the constant-time update for one student's next answers")
    tr = BayesianKnowledgeTracer(table.default)
    p = tr.params.p_init
    for c in (1, 1, 0, 1, 1, 1):
        p = tr.update(p, bool(c))
        print(
            f"   answer {'correct' if c else 'wrong  '} -> P(mastery) {p:.3f} "
            f"({mastery_status(p)}), P(next correct) {tr.predict_next(p):.3f}"
        )
    _demo_serve(table, outdir)
    print(f"wrote {outdir}/")
    return 0


def _demo_serve(table: ParamTable, outdir: Path) -> None:
    """End to end: serve the exported table over HTTP on loopback (SQLite in
    OUT), record a flashcard session and a multi-skill exam answer, read back."""
    import secrets
    import socket
    import threading

    import httpx
    import uvicorn

    from .service import create_app
    from .store import MasteryStore

    db = outdir / "mastery.db"
    db.unlink(missing_ok=True)
    store = MasteryStore(f"sqlite:///{db}", table)
    key = secrets.token_hex(16)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(store, api_key=key), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    print(f"== 5. serve the parameters over HTTP ({url}, SQLite {db})")
    skills = sorted(table)[:2] or ["fractions", "ratios"]
    try:
        with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=30) as c:
            session = {
                "user_id": "demo-student",
                "skill": skills[0],
                "responses": [
                    {"event_id": f"card-{i}", "correct": bool(x)}
                    for i, x in enumerate((1, 0, 1, 1, 1))
                ],
            }
            r = c.post("/v1/flashcard-sessions", json=session).json()
            row = r["mastery"][0]
            print(
                f"   flashcard session on {skills[0]!r}: {r['recorded']} responses -> "
                f"P(mastery) {row['p_mastery']:.3f} ({row['status']})"
            )
            again = c.post("/v1/flashcard-sessions", json=session).json()
            print(f"   the same session retried: {again['recorded']} recorded (idempotent)")
            exam = {
                "user_id": "demo-student",
                "answers": [{"event_id": "exam-1", "correct": True, "skills": skills}],
            }
            c.post("/v1/exam-answers", json=exam).raise_for_status()
            rows = c.get("/v1/users/demo-student/mastery").json()["mastery"]
            for m in rows:
                print(
                    f"   {m['skill']:<45} P(mastery) {m['p_mastery']:.3f} {m['status']:<12} "
                    f"attempts {m['attempts']}"
                )
            pred = c.get(f"/v1/users/demo-student/skills/{skills[0]}/prediction").json()
            print(f"   P(next answer correct) on {skills[0]!r}: {pred['p_correct']:.3f}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        store.close()


def _demo_fit(args: argparse.Namespace, events, outdir: Path, auc_default: float) -> None:

    from .export import ExportError
    from .models import COLLAPSE_MAX_SEQUENCES, COLLAPSE_MIN_RESPONSES, BKTModel
    from .plots import plot_forest, plot_mastery_trajectory
    from .tracing import replay

    print(
        f"== 3. fit the hierarchical model on the bundled data: {args.chains} chains x "
        f"({args.tune} tuning + {args.draws} draws), nutpie"
    )
    model = BKTModel()
    _fit_quietly(model, events, args)
    fi, d = model.fit_info, model.diagnostics
    print(
        f"   fast estimate {fi['fast_estimate']['seconds']:.2f} s; compile "
        f"{fi['compile_seconds']:.1f} s; sampling {fi['sampling_seconds']:.1f} s"
    )
    print(
        f"   max R-hat {d['max_rhat']:.3f}, min bulk ESS {d['min_ess_bulk']:.0f}, "
        f"min tail ESS {d['min_ess_tail']:.0f}, divergences {d['divergences']}"
    )
    if not d["ok"]:
        print(
            f"   diagnostics FAIL the 1.01 / 400 bar (worst: {d['worst_rhat'][0][0]}); the "
            "export below is forced and says so in its metadata"
        )
    modes = model.skill_modes()
    collapsed = model.fit_info.get("collapsed", {})
    for skill, grp in modes.groupby("skill", sort=False):
        minor = grp.iloc[1:]
        how = "collapsed, drawn given the population" if skill in collapsed else "NUTS"
        print(
            f"   {skill!r} has {len(grp)} modes given the population: the others hold "
            f"{minor['share'].sum():.1%} of its posterior and {minor['fit_share'].sum():.1%} of "
            f"the draws (valley {minor['valley'].max():.1f} nats; {how}; "
            "bktbayes.BKTModel.skill_modes)"
        )
    few = [s for s, j in collapsed.items() if j.get("reason") == "few long sequences"]
    if few:
        print(
            f"   collapsed for few long sequences (fewer than {COLLAPSE_MAX_SEQUENCES} "
            f"students, {COLLAPSE_MIN_RESPONSES}+ responses; drawn given the population): "
            f"{', '.join(repr(s) for s in few)}"
        )
    model.save(outdir / "fit")
    try:
        table = model.export_params(n_draws=100)
    except ExportError:
        table = model.export_params(n_draws=100, force=True)
    table.to_json(outdir / "params.json")
    for name in ("p_transit", "p_slip"):
        plot_forest(model.idata, name).savefig(outdir / f"forest_{name}.png", dpi=110)
    first = events.iloc[0]
    seq = events[(events["user_id"] == first["user_id"]) & (events["skill"] == first["skill"])]
    fig = plot_mastery_trajectory(
        seq.sort_values("order")["correct"], table, skill=first["skill"], user=first["user_id"]
    )
    fig.savefig(outdir / "trajectory.png", dpi=110)
    res = replay(events, table, interval=0.9)
    res.mastery_frame().to_csv(outdir / "mastery.csv", index=False)
    auc = _auc(events["correct"].to_numpy(), res.p_correct)
    m = res.mastery
    sure = int((m["p_mastered"] >= 0.9).sum())
    print(
        f"   scored with the exported posterior means: in-sample one-step AUC {auc:.3f} "
        f"(seed defaults {auc_default:.3f}); {sure:,} (user, skill) rows mastered with "
        f"90% credibility"
    )
    print(
        f"   wrote {outdir / 'fit'}, params.json, mastery.csv (with 90% intervals), "
        "forest_p_transit.png, forest_p_slip.png, trajectory.png"
    )


def _auc(y, p) -> float:
    """Rank AUC (Mann-Whitney), ties averaged."""
    import numpy as np
    from scipy.stats import rankdata

    y = np.asarray(y).astype(bool)
    r = rankdata(p)
    n1 = int(y.sum())
    n0 = y.size - n1
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bktbayes",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    def add_param_args(p: argparse.ArgumentParser) -> None:
        d = BKTParams()
        p.add_argument("--p-init", type=float, default=d.p_init, help="P(L0) (default 0.3)")
        p.add_argument("--p-transit", type=float, default=d.p_transit, help="P(T) (default 0.09)")
        p.add_argument("--p-guess", type=float, default=d.p_guess, help="P(G) (default 0.2)")
        p.add_argument("--p-slip", type=float, default=d.p_slip, help="P(S) (default 0.1)")
        p.add_argument("--p-forget", type=float, default=d.p_forget, help="P(F) (default 0)")

    s = sub.add_parser(
        "score",
        help="replay events through the tracer",
        description="Replay an event history with a parameter file. Writes "
        "per-event predictions (P(correct) before, P(mastery) after) and the "
        "final mastery per (user, skill), CSV or Parquet by extension.",
    )
    s.add_argument("events", help="events file (.csv or .parquet; layout recognised)")
    s.add_argument("--params", help="parameter JSON (default: the seed card's defaults)")
    s.add_argument(
        "--out",
        required=True,
        help="per-event output (.csv, .csv.gz, .parquet; a directory with --dask)",
    )
    s.add_argument("--mastery-out", help="mastery table output (default: OUT.mastery.EXT)")
    s.add_argument("--format", default="auto", help="input layout (default: auto)")
    s.add_argument(
        "--drop-missing-skill",
        action="store_true",
        help="exclude (and count) rows without a skill instead of failing",
    )
    s.add_argument(
        "--keep-first-duplicate",
        action="store_true",
        help="keep the first of duplicated (user, skill, order) rows",
    )
    s.add_argument(
        "--dask",
        metavar="local|ADDRESS",
        help="replay a user-partitioned Parquet directory on Dask (a LocalCluster or a "
        "scheduler address); OUT is then a directory of mastery files",
    )
    s.set_defaults(func=_cmd_score)

    pa_ = sub.add_parser(
        "partition",
        help="split an events file into user-partitioned Parquet files (for --dask)",
    )
    pa_.add_argument("events", help="events file (.csv or .parquet; layout recognised)")
    pa_.add_argument("out", help="directory to create")
    pa_.add_argument("--partitions", type=int, default=16, help="number of files (default 16)")
    pa_.add_argument("--format", default="auto", help="input layout (default: auto)")
    pa_.set_defaults(func=_cmd_partition)

    m = sub.add_parser(
        "simulate",
        help="draw synthetic responses",
        description="Simulate responses from BKT parameters (a parameter file, "
        "or one set of values for every skill).",
    )
    m.add_argument("--out", required=True, help="output events file (.csv or .parquet)")
    m.add_argument("--params", help="parameter JSON with per-skill values")
    m.add_argument("--users", type=int, default=200, help="number of students (default 200)")
    m.add_argument("--skills", type=int, default=5, help="number of skills without --params")
    m.add_argument("--skills-per-user", type=int, help="skills each student practises")
    m.add_argument(
        "--mean-length",
        type=float,
        default=20.0,
        help="mean responses per (student, skill), geometric (default 20)",
    )
    m.add_argument("--max-length", type=int, help="truncate sequences at this length")
    m.add_argument(
        "--student-sd-init",
        type=float,
        default=0.0,
        help="sd of per-student logit offsets on p_init",
    )
    m.add_argument(
        "--student-sd-transit",
        type=float,
        default=0.0,
        help="sd of per-student logit offsets on p_transit",
    )
    m.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_param_args(m)
    m.set_defaults(func=_cmd_simulate)

    p = sub.add_parser("params", help="write or check a parameter file")
    p.add_argument("action", choices=["default", "check"])
    p.add_argument("path", nargs="?", help="file to check")
    p.add_argument("--out", help="where 'default' writes")
    p.add_argument("--skill", action="append", help="skill to list (repeatable)")
    add_param_args(p)
    p.set_defaults(func=_cmd_params)

    def add_fit_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("events", help="events file (.csv or .parquet; layout recognised)")
        p.add_argument("--model", default="hierarchical", help=_MODEL_HELP)
        p.add_argument("--draws", type=int, default=1000, help="posterior draws per chain")
        p.add_argument("--tune", type=int, default=1000, help="tuning steps per chain")
        p.add_argument("--chains", type=int, default=4, help="chains")
        p.add_argument("--seed", type=int, default=1, help="random seed")
        p.add_argument("--format", default="auto", help="input layout (default: auto)")
        p.add_argument(
            "--export-draws", type=int, default=100, help="posterior draws to export (default 100)"
        )

    f = sub.add_parser("fit", help="fit a BKT model with NUTS and export its parameters")
    add_fit_args(f)
    f.add_argument("--out", required=True, help="output directory")
    f.add_argument(
        "--force", action="store_true", help="export even if diagnostics fail (recorded)"
    )
    f.set_defaults(func=_cmd_fit)

    e = sub.add_parser("evaluate", help="cross-validated one-step-ahead metrics, folds by student")
    add_fit_args(e)
    e.add_argument("--folds", type=int, default=5, help="folds without a 'fold' column")
    e.add_argument(
        "--method",
        default="nuts",
        choices=["nuts", "ml"],
        help="posterior (nuts) or per-skill maximum likelihood (ml, fast)",
    )
    e.add_argument("--out", help="CSV of per-fold metrics")
    e.set_defaults(func=_cmd_evaluate)

    c = sub.add_parser("compare", help="PSIS-LOO comparison of fitted models (fit output dirs)")
    c.add_argument("dirs", nargs="+", help="directories written by 'bktbayes fit'")
    c.set_defaults(func=_cmd_compare)

    v = sub.add_parser(
        "serve",
        help="run the HTTP mastery service",
        description="Serve mastery rows over HTTP: record flashcard sessions and exam "
        "answers, read mastery, predict the next response, recalculate. The API key "
        "(for writes) comes from --api-key or BKTBAYES_API_KEY; without one writes are open.",
    )
    v.add_argument("--params", help="parameter JSON (default: the seed card's defaults)")
    v.add_argument("--db", default="sqlite:///mastery.db", help="SQLAlchemy URL")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    v.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    v.add_argument("--api-key", help="API key for writes (or env BKTBAYES_API_KEY)")
    v.add_argument("--log-level", default="info", help="uvicorn log level")
    v.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes (default 1; the database's locks keep them consistent)",
    )
    v.add_argument(
        "--no-fast-writes",
        dest="fast_writes",
        action="store_false",
        help="route the write endpoints through FastAPI too (the same responses, more CPU)",
    )
    v.set_defaults(func=_cmd_serve)

    r = sub.add_parser(
        "recalculate",
        help="rebuild mastery rows from the event log",
        description="Replay a database's event log with a parameter file and rewrite "
        "its mastery rows (the store then serves those parameters' version).",
    )
    r.add_argument("--db", default="sqlite:///mastery.db", help="SQLAlchemy URL")
    r.add_argument("--params", help="parameter JSON (default: the seed card's defaults)")
    r.add_argument("--user", action="append", help="only this user (repeatable)")
    r.add_argument(
        "--bulk",
        default="auto",
        choices=["auto", "parallel", "adbc", "sqlalchemy"],
        help="how to read the log (default on PostgreSQL: 'parallel' for the whole log, "
        "'adbc' for some users or with item parameters; elsewhere 'sqlalchemy')",
    )
    r.set_defaults(func=_cmd_recalculate)

    d = sub.add_parser("demo", help="the quick-start job on the bundled data")
    d.add_argument("--events", default=str(BUNDLED_DATA), help="events file")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument(
        "--no-fit",
        dest="fit",
        action="store_false",
        help="skip the Bayesian fit (score with the seed defaults only)",
    )
    d.add_argument("--draws", type=int, default=1000, help="posterior draws per chain")
    d.add_argument("--tune", type=int, default=1000, help="tuning steps per chain")
    d.add_argument("--chains", type=int, default=4, help="chains")
    d.add_argument("--seed", type=int, default=1, help="random seed")
    d.set_defaults(func=_cmd_demo)
    return ap


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``bktbayes`` command; returns the exit status."""
    ap = _parser()
    args = ap.parse_args(argv)
    if not getattr(args, "command", None):
        ap.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (BKTInputError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"bktbayes {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
