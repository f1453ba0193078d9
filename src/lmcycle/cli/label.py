"""``lmcycle label init|add-user|import|guidelines|export|stats|serve``: the admin side of a labeling project
(lmcycle.feedback), and ``serve``, the labeling app. ``--db`` is a SQLite file or a ``postgresql://`` URL.

Secrets stay off the command line, where ``ps`` and the shell history would show them: ``add-user`` asks for
the password twice on the terminal, or reads the first line of ``--password-file`` (``-``: standard input);
a Postgres password goes in ``PGPASSWORD`` or ``~/.pgpass`` (libpq reads both), not in the URL.
"""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path

from lmcycle.errors import LmcycleError
from lmcycle.feedback.agreement import agreement_plot, agreement_report, render_agreement
from lmcycle.feedback.db import Database
from lmcycle.feedback.export import rankings_from_snapshot, write_export
from lmcycle.feedback.labels import RatingScale
from lmcycle.feedback.schema import migrate
from lmcycle.feedback.stats import project_stats
from lmcycle.feedback.store import LabelStore, NotFound
from lmcycle.terminal import columns, printable

DB_HELP = "SQLite file, or postgresql://USER@HOST[:PORT]/DB (password from PGPASSWORD or ~/.pgpass)"


def add_parser(sub) -> None:
    """Add the ``label`` command and its actions to the CLI's subparsers."""
    lb = sub.add_parser("label", help="human-feedback labels: the label database, accounts, items, export, stats")
    act = lb.add_subparsers(dest="action", required=True)

    init = act.add_parser("init", help="create the label database (or upgrade an older one) and a project")
    init.add_argument("--db", required=True, help=DB_HELP)
    init.add_argument("--project", default="default", help="the project to create if missing (default: default)")
    init.add_argument("--overlap", type=int, default=3, help="labelers per item when the file gives none")
    init.add_argument("--rating", metavar="NAME:MIN:MAX",
                      help="a scalar rating per completion, e.g. toxicity:0:1 (default: none)")
    init.add_argument("--too-fast-s", type=float, default=3.0,
                      help="a label submitted sooner than this after its item was shown is flagged")
    init.add_argument("--guidelines", metavar="FILE.md", help="the labelers' instructions (Markdown)")

    # allow_abbrev=False: argparse would take `--password SECRET` for --password-file and print SECRET in the
    # "file not found" error
    au = act.add_parser("add-user", help="create an account (the password is prompted for, or read from a file)",
                        allow_abbrev=False)
    au.add_argument("name")
    au.add_argument("--role", required=True, choices=("admin", "labeler"))
    au.add_argument("--db", required=True, help=DB_HELP)
    au.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE "
                    "('-': standard input) instead of prompting")

    im = act.add_parser("import", help="add a completions file's items to a project (all or nothing)")
    im.add_argument("file", help="JSON Lines: prompt_id, prompt, completions [{id, text, model, decoding}], "
                                 "optional gold, overlap, meta; or a completions stage's folder (RUN_DIR/STAGE)")
    im.add_argument("--db", required=True, help=DB_HELP)
    im.add_argument("--project", default="default")

    gl = act.add_parser("guidelines", help="publish a new version of a project's guidelines")
    gl.add_argument("file", metavar="FILE.md")
    gl.add_argument("--db", required=True, help=DB_HELP)
    gl.add_argument("--project", default="default")

    ex = act.add_parser("export", help="write the labels as rankings (data: {format: rankings}), plain JSON Lines "
                        "or a Hugging Face dataset folder (hf: the rankings rows, datasets.load_from_disk)")
    ex.add_argument("--db", required=True, help=DB_HELP)
    ex.add_argument("--out", required=True, help="a file (rankings, jsonl) or a folder (hf)")
    ex.add_argument("--format", choices=("rankings", "jsonl", "hf"), default="rankings")
    ex.add_argument("--project", default="default")

    st = act.add_parser("stats", help="done / left per labeler and overall, gold accuracy, too-fast submissions, "
                        "agreement between labelers (Krippendorff's alpha, tau-b, outliers)")
    st.add_argument("--db", required=True, help=DB_HELP)
    st.add_argument("--project", default="default")
    st.add_argument("--too-fast-s", type=float, help="the threshold in seconds (default: the project's)")
    st.add_argument("--json", action="store_true", help="print one JSON object (agreement under 'agreement')")
    st.add_argument("--plot", metavar="FILE.png", help="also draw the agreement (tau-b heatmap, per-labeler bars)")

    sv = act.add_parser("serve", help="run the labeling app (web pages and JSON API) with uvicorn")
    sv.add_argument("--db", required=True, help=DB_HELP)
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--project", default="default")
    sv.add_argument("--secure-cookies", action="store_true",
                    help="mark the cookies Secure: set it when the app is reached over HTTPS (a TLS proxy)")


def run(args) -> int:
    """Run one ``lmcycle label`` action."""
    if args.action == "init":
        return _init(args)
    with LabelStore.open(args.db) as store:
        if args.action == "add-user":
            user = store.add_user(args.name, args.role, _password(args.password_file))
            print(f"user '{user.name}' ({user.role}) added")
        elif args.action == "import":
            n = store.import_file(_completions_file(args.file), args.project)
            print(f"imported {n} item(s) into project '{args.project}'")
        elif args.action == "guidelines":
            version = store.set_guidelines(_read_text(args.file), args.project)
            print(f"project '{args.project}': guidelines version {version}")
        elif args.action == "export":
            n = write_export(store.snapshot(args.project), args.out, args.format)
            print(f"wrote {n} label(s) to {printable(str(args.out))} ({args.format})")
        elif args.action == "stats":
            _stats(store, args)
        elif args.action == "serve":
            return _serve(store, args)
    return 0


def _stats(store: LabelStore, args) -> None:
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise LmcycleError(f"the plot is a PNG file: give a name ending in .png, got '{printable(args.plot)}'",
                           file="command line", field="--plot")
    snap = store.snapshot(args.project)  # one read: the agreement is over the labels the stats count
    stats = project_stats(snap, args.too_fast_s)
    stats["agreement"] = agreement_report(*rankings_from_snapshot(snap))
    if args.plot is not None:
        agreement_plot(stats["agreement"], args.plot)
    if args.json:
        print(json.dumps(stats, indent=2, ensure_ascii=False))
    else:
        print(render_stats(stats) + "\n\n" + render_agreement(stats["agreement"]))
    if args.plot is not None and not args.json:
        print(f"agreement plot: {printable(args.plot)}")


def _serve(store: LabelStore, args) -> int:
    try:
        import uvicorn

        from lmcycle.feedback.web import create_app  # lazy: FastAPI and Jinja2 load only to serve
    except ImportError as e:
        raise LmcycleError(f"the labeling app needs {e.name}: pip install 'lmcycle[label]'") from None

    app = create_app(store, project=args.project, secure_cookies=args.secure_cookies)
    print(f"labeling app for project '{args.project}' on http://{args.host}:{args.port}/", flush=True)
    # h11 bounds the request head it buffers (httptools, uvicorn's default when installed, does not)
    uvicorn.run(app, host=args.host, port=args.port, http="h11", log_level="info")
    return 0


def _completions_file(path: str) -> Path:
    """The completions file itself, or the ``completions.jsonl`` of a completions stage's folder."""
    p = Path(path)
    if not p.is_dir():
        return p  # read_completions names a missing file
    if not (p / "completions.jsonl").is_file():
        raise LmcycleError("a folder without completions.jsonl: give a completions file or a completions stage's "
                           "folder (RUN_DIR/STAGE)", file=p)
    return p / "completions.jsonl"


def _init(args) -> int:
    db = Database(args.db, create=True)
    before, after = migrate(db)
    print(f"label database {printable(db.where)}: schema version {after}"
          + ("" if before == after else f" (was {before})" if before else " (created)"))
    with LabelStore(db) as store:
        try:
            project = store.project(args.project)
            print(f"project '{project.name}' exists; its settings are kept")
        except NotFound:
            project = store.create_project(args.project, overlap=args.overlap, too_fast_s=args.too_fast_s,
                                           rating_scale=_rating(args.rating),
                                           guidelines=_read_text(args.guidelines) if args.guidelines else "")
            scale = project.rating_scale
            print(f"project '{project.name}' created: overlap {project.overlap}, too fast under "
                  f"{project.too_fast_s:g} s" + (f", rating {scale.name} {scale.min:g}-{scale.max:g}" if scale else ""))
    return 0


def _rating(spec: str | None):
    if spec is None:
        return None
    parts = spec.split(":")
    try:
        name, low, high = parts
        return RatingScale(name, float(low), float(high))
    except ValueError:
        raise LmcycleError(f"--rating takes NAME:MIN:MAX (e.g. toxicity:0:1), got '{spec}'", file="command line",
                           field="--rating") from None


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LmcycleError("file not found", file=path) from None
    except UnicodeDecodeError as e:
        raise LmcycleError(f"not valid UTF-8 ({e.reason} at byte {e.start})", file=path) from None


def _password(password_file: str | None) -> str:
    if password_file == "-":
        return sys.stdin.readline().rstrip("\r\n")
    if password_file is not None:
        lines = _read_text(password_file).splitlines()
        return lines[0] if lines else ""
    if not sys.stdin.isatty():
        raise LmcycleError("no terminal to ask for the password on: give --password-file FILE ('-' reads "
                           "standard input)", file="command line", field="--password-file")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise LmcycleError("the two passwords differ", file="command line", field="password")
    return first


def render_stats(stats: dict) -> str:
    """The stats as a short text report: the overall line, then one row per labeler."""
    o = stats["overall"]
    lines = [f"project '{stats['project']}': {o['items']} items ({o['gold_items']} gold), {o['items_complete']} "
             f"complete; labels {o['done']} done, {o['left']} left of {o['labels_needed']}; {o['too_fast']} "
             f"submitted in under {stats['too_fast_s']:g} s", ""]
    head = ("labeler", "done", "left", "gold acc", "gold n", "too fast", "median s", "special")
    rows = [head]
    for r in stats["labelers"]:
        acc = "-" if r["gold_accuracy"] is None else f"{r['gold_accuracy']:.2f}"
        med = "-" if r["median_seconds"] is None else f"{r['median_seconds']:.1f}"
        special = ", ".join(f"{k} {v}" for k, v in sorted(r["special"].items())) or "-"
        rows.append((printable(r["labeler"]), str(r["done"]), str(r["left"]), acc, str(r["gold_labels"]),
                     str(r["too_fast"]), med, special))
    lines += columns(rows)
    return "\n".join(lines)
