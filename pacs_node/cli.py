"""The `pacs-node` command: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from . import __version__, logs
from .config import Settings, load
from .errors import PacsNodeError

log = logging.getLogger("pacs_node.cli")

DEFAULT_CONFIG = os.environ.get("PACS_NODE_CONFIG", "config.toml")


def _settings(args: argparse.Namespace) -> Settings:
    return load(args.config)


def _files_under(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise PacsNodeError(f"{path} does not exist")
    return found


def cmd_serve(args: argparse.Namespace) -> int:
    from .node import Node

    settings = _settings(args)
    logs.setup(settings.node.log_level)
    log.info("pacs-node %s starting with %s", __version__, settings.source)
    Node(settings, run_worker=False if args.no_worker else None).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    import threading

    from .jobs import Worker, recover
    from .store.files import FileStore
    from .store.index import Database

    settings = _settings(args)
    logs.setup(settings.node.log_level)
    if args.device:
        os.environ["PACS_NODE_DEVICE"] = args.device  # read by learned pipelines (pipelines.base.device)
    db = Database(settings.node.database_url)
    recover(db, single_process=False)
    pipelines = [p for p in (args.pipelines or "").split(",") if p] or None
    worker = Worker(db, FileStore(settings.node.storage_dir), settings, pipelines)
    log.info("worker %s started (pipelines: %s, device: %s)", worker.owner,
             ",".join(pipelines) if pipelines else "all", args.device or "auto")
    if pipelines:
        from .pipelines import preload

        preload(pipelines)  # load models once, up front, and keep them resident
    stop = threading.Event()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.run(stop)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from .net.scu import SendError, send_files

    logs.setup("INFO")
    files = [p for p in _files_under(args.paths) if _is_dicom_file(p)]
    if not files:
        print("no DICOM files found", file=sys.stderr)
        return 2
    try:
        report = send_files(files, args.calling_aet, args.called_aet, args.host, args.port, args.timeout)
    except SendError as exc:
        print(f"send failed: {exc}", file=sys.stderr)
        return 1
    for path, status in report.rejected:
        print(f"rejected {path} status {status}", file=sys.stderr)
    print(f"sent {len(report.ok)} of {len(files)} instance(s) to {args.called_aet}@{args.host}:{args.port}")
    return 0 if not report.rejected else 1


def _is_dicom_file(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            if fh.read(4) == b"DICM":
                return True
    except OSError:
        return False
    print(f"skipping {path}: not a DICOM Part 10 file", file=sys.stderr)
    return False


def cmd_run(args: argparse.Namespace) -> int:
    from .process import process_series
    from .volume import group_by_series

    logs.setup("INFO")
    params = _parse_params(args.param)
    outputs = tuple(o for o in (args.outputs or "").split(",") if o)
    groups = group_by_series(_files_under([args.input]))
    if not groups:
        print(f"no DICOM image series under {args.input}", file=sys.stderr)
        return 2
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for series_uid, items in groups.items():
        try:
            datasets, timings = process_series([p for p, _ in items], args.pipeline, params, outputs)
        except PacsNodeError as exc:
            print(f"series {series_uid}: {exc}", file=sys.stderr)
            failures += 1
            continue
        for ds in datasets:
            ds.save_as(out_dir / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        stages = " ".join(f"{k}={v:.2f}s" for k, v in timings.items())
        print(f"series {series_uid}: {len(items)} instance(s) -> {len(datasets)} result(s) in {out_dir} [{stages}]")
    return 1 if failures else 0


def _parse_params(pairs: list[str] | None) -> dict[str, object]:
    from .config import toml_value

    params: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise PacsNodeError(f"--param {pair!r}: expected KEY=VALUE")
        params[key] = toml_value(value)
    return params


def cmd_rules_test(args: argparse.Namespace) -> int:
    from .route import Router
    from .volume import group_by_series

    settings = _settings(args)
    router = Router(settings.rules)
    groups = group_by_series(_files_under(args.paths))
    if not groups:
        print("no DICOM image series found", file=sys.stderr)
        return 2
    for series_uid, items in groups.items():
        ds = items[0][1]
        print(f"series {series_uid} ({ds.get('Modality', '?')}, {len(items)} instance(s)):")
        decisions = router.decide(ds, args.calling_aet)
        for d in decisions:
            mark = "MATCH" if d.matched else "     "
            target = f"-> {d.rule.pipeline} -> {', '.join(d.rule.destinations) or '(no destination)'}"
            print(f"  {mark} {d.rule.name} {target if d.matched else ''}".rstrip())
            print(f"        {d.reason}")
        if not any(d.matched for d in decisions):
            print("  no rule matched: the series would be stored and not processed")
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from .store.index import Database, Delivery, Job, Series

    settings = _settings(args)
    db = Database(settings.node.database_url)
    with db.session() as session:
        q = select(Job, Series.series_uid).join(Series, Series.id == Job.series_id).order_by(Job.id.desc()).limit(args.limit)
        if args.state:
            q = q.where(Job.state == args.state)
        rows = session.execute(q).all()
        print(f"{'ID':>5}  {'STATE':8} {'PIPELINE':22} {'RULE':18} {'N':>4}  {'CREATED (UTC)':19}  SERIES / ERROR")
        for job, series_uid in rows:
            print(f"{job.id:>5}  {job.state:8} {job.pipeline[:22]:22} {job.rule[:18]:18} {job.result_count:>4}  "
                  f"{job.created_at:%Y-%m-%d %H:%M:%S}  {series_uid}")
            for d in session.execute(select(Delivery).where(Delivery.job_id == job.id)).scalars():
                extra = f" ({d.last_error})" if d.last_error else ""
                print(f"{'':7}-> {d.destination} {d.ae_title}@{d.host}:{d.port}: {d.state}, "
                      f"{d.sent_count} sent, attempt {d.attempts}{extra}")
            if job.error and job.state == "failed":
                print(f"{'':7}error: {job.error}")
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from .jobs import retry
    from .store.index import Database

    settings = _settings(args)
    print(retry(Database(settings.node.database_url), args.job_id))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    module_name = "pacs_node.ml." + args.name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise PacsNodeError(f"no trainable model named {args.name!r}") from None
    logs.setup("INFO")
    entry = getattr(module, "train_main" if args.models_cmd == "train" else "eval_main")
    return int(entry(list(args.rest)) or 0)


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_checks

    settings = _settings(args)
    # models are loaded on the CPU: no GPU memory taken beside a running node's
    os.environ["PACS_NODE_DEVICE"] = "cpu"
    logs.setup("WARNING")  # the findings are the output; library chatter is not
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # a peer that is down is a finding, not a traceback
    failed = warned = 0
    for finding in run_checks(settings, echo=not args.no_echo, pipelines=not args.no_pipelines):
        print(f"{finding.level:<5} {finding.what:<15} {finding.detail}", flush=True)
        failed += finding.level == "FAIL"
        warned += finding.level == "warn"
    print(f"{failed} problem(s), {warned} warning(s)" if failed or warned else "all checks passed")
    return 1 if failed else 0


def cmd_pipelines(args: argparse.Namespace) -> int:
    from .pipelines import available

    for name in available():
        print(name)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacs-node", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pacs-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", default=DEFAULT_CONFIG, help="config file (default: %(default)s, or $PACS_NODE_CONFIG)")
        return p

    p = with_config(sub.add_parser("serve", help="run the node: DICOM SCP, completion, routing, worker, sender"))
    p.add_argument("--no-worker", action="store_true", help="receive and send only; jobs run in `pacs-node worker`")
    p.set_defaults(fn=cmd_serve)

    p = with_config(sub.add_parser("worker", help="run jobs only (several workers may share one database)"))
    p.add_argument("--pipelines", help="comma-separated pipelines this worker runs (default: all); loaded at start")
    p.add_argument("--device", help="torch device for learned pipelines, e.g. cuda:0 or cpu (default: cuda if present)")
    p.set_defaults(fn=cmd_worker)

    p = sub.add_parser("send", help="send DICOM files or folders with C-STORE")
    p.add_argument("paths", nargs="+")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--called-aet", required=True)
    p.add_argument("--calling-aet", default="PACSNODE-SCU")
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(fn=cmd_send)

    p = sub.add_parser("run", help="run a pipeline on a folder of DICOM files, write results to a folder")
    p.add_argument("pipeline")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--param", action="append", help="pipeline parameter KEY=VALUE (TOML value), repeatable")
    p.add_argument("--outputs", help="comma-separated output kinds (default: the pipeline's)")
    p.set_defaults(fn=cmd_run)

    rules = sub.add_parser("rules", help="routing rules").add_subparsers(dest="rules_cmd", required=True)
    p = with_config(rules.add_parser("test", help="show which rule matches each series under PATH, and why not"))
    p.add_argument("paths", nargs="+")
    p.add_argument("--calling-aet", default="", help="value of CallingAETitle for the test")
    p.set_defaults(fn=cmd_rules_test)

    jobs = sub.add_parser("jobs", help="inspect and retry jobs").add_subparsers(dest="jobs_cmd", required=True)
    p = with_config(jobs.add_parser("list", help="list recent jobs with their deliveries"))
    p.add_argument("--state", choices=["queued", "running", "sending", "done", "failed"])
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(fn=cmd_jobs_list)
    p = with_config(jobs.add_parser("retry", help="retry a failed job (resend, or rerun if it never encoded)"))
    p.add_argument("job_id", type=int)
    p.set_defaults(fn=cmd_jobs_retry)

    models = sub.add_parser("models", help="train and evaluate models").add_subparsers(dest="models_cmd", required=True)
    for name in ("train", "eval"):
        p = models.add_parser(name, help=f"{name} a model; arguments after NAME go to the model's own command")
        p.add_argument("name")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=cmd_models)

    p = with_config(sub.add_parser("check", help="check storage, database, ports, TLS, the rules' models and "
                                                 "the peers (C-ECHO) without starting the node; exit 1 on a failure"))
    p.add_argument("--no-echo", action="store_true", help="do not call the peers (C-ECHO) nor the webhook hosts")
    p.add_argument("--no-pipelines", action="store_true", help="do not load the rules' pipelines (models)")
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("pipelines", help="list pipeline names usable in rules")
    p.set_defaults(fn=cmd_pipelines)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except PacsNodeError as exc:
        print(f"pacs-node: {exc}", file=sys.stderr)
        return 2
    except LookupError as exc:
        print(f"pacs-node: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"pacs-node: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
