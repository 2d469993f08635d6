"""`ingest`: the one command operators use. `ingest --help` lists what it does."""

import argparse
import os
import sys

import orjson

from schema.logs import configure as configure_logging
from schema.settings import get_settings


def _db_upgrade(_: argparse.Namespace) -> None:
    from schema.db import upgrade

    upgrade()


def _api(args: argparse.Namespace) -> None:
    import uvicorn

    from api_shim.server import GuardedHttpToolsProtocol, raise_open_files_limit

    settings = get_settings()
    raise_open_files_limit(settings)
    # ws="none": no route is a WebSocket, so an Upgrade header must not hand the connection to another protocol
    # (and out of reach of the slow-client guard).
    uvicorn.run(
        "api_shim.app:create_app", factory=True, host=args.host, port=args.port, workers=args.workers,
        ssl_certfile=args.tls_cert, ssl_keyfile=args.tls_key, loop="uvloop", http=GuardedHttpToolsProtocol,
        ws="none", access_log=False, log_level=settings.log_level.lower(), backlog=4096, log_config=None,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
    )


def _worker(args: argparse.Namespace) -> None:
    # Before anything imports prometheus_client: the worker's children count into files in this directory,
    # which the parent serves summed.
    metrics_dir = os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", f"/tmp/ingest-worker-{os.getpid()}")
    os.makedirs(metrics_dir, exist_ok=True)
    for stale in os.listdir(metrics_dir):  # counts of an earlier worker would be added to ours
        os.unlink(os.path.join(metrics_dir, stale))
    from worker import metrics
    from worker.app import app

    settings = get_settings()
    _check_dedupe_window()
    concurrency = args.concurrency or settings.worker_concurrency
    queues = {"ops": [settings.queue], "webhooks": [settings.webhook_queue],
              "all": [settings.queue, settings.webhook_queue]}[args.queues]
    metrics.serve(args.metrics_host, args.metrics_port, concurrency, ",".join(queues))
    app.worker_main([
        "worker", "--queues", ",".join(queues), "--concurrency", str(concurrency),
        "--loglevel", settings.log_level, "--without-gossip", "--without-mingle",
    ])


def _admin(args: argparse.Namespace) -> None:
    from ingest.admin import Admin

    admin = Admin(get_settings())
    if args.what == "project":
        print(admin.create_project(args.name, exist_ok=args.exist_ok))
    elif args.what in ("config", "milestone"):
        print(admin.create_named(args.what + "s", args.project, args.name))
    elif args.what == "token" and args.action == "create":
        print(admin.create_token(args.user, args.project))
    elif args.what == "token" and args.action == "revoke":
        admin.revoke_token(args.token)


def _run_complete(args: argparse.Namespace) -> None:
    from worker.sweeper import complete_run

    if complete_run(args.run_id, "forced"):
        print(f"run {args.run_id} completed")
    else:
        print(f"run {args.run_id}: no such open run", file=sys.stderr)
        sys.exit(1)


def _run_delete(args: argparse.Namespace) -> None:
    from ingest.admin import Admin
    from worker.lifecycle import delete_run

    admin = Admin(get_settings())
    try:
        results = delete_run(admin.engine, admin.redis, args.run_id)
    finally:
        admin.close()
    if results is None:
        print(f"run {args.run_id}: no such run", file=sys.stderr)
        sys.exit(1)
    print(f"run {args.run_id} deleted, with its threads and {results:,} results")


def _project_retention(args: argparse.Namespace) -> None:
    from ingest.admin import Admin

    days = None if args.days == "default" else int(args.days)
    admin = Admin(get_settings())
    try:
        admin.set_retention(args.project, days)
    finally:
        admin.close()
    keeps = ("INGEST_RETENTION_DAYS" if days is None else "forever" if days == 0 else f"{days} days")
    print(f"project {args.project}: completed runs are kept {keeps} after their completion")


def _retention_apply(args: argparse.Namespace) -> None:
    from sqlalchemy import create_engine

    from worker.lifecycle import LifecycleError, apply_retention

    settings = get_settings()
    _check_dedupe_window()
    engine = create_engine(settings.database_url)
    try:
        report = apply_retention(engine, settings, dry_run=args.dry_run)
    except LifecycleError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        sys.exit(1)
    finally:
        engine.dispose()
    print("\n".join(report.lines()))


def _webhook(args: argparse.Namespace) -> None:
    from ingest.admin import Admin

    admin = Admin(get_settings())
    try:
        if args.action == "create":
            webhook_id, secret = admin.create_webhook(args.project, args.url, args.secret)
            print(webhook_id)
            if args.secret is None:
                print(f"secret: {secret}")
        elif args.action == "list":
            print(f"{'id':>6} {'project':>8} {'created':<20} url")
            for w in admin.webhooks():
                print(f"{w['id']:>6} {w['project_id']:>8} {w['created_at']:%Y-%m-%d %H:%M:%S}  {w['url']}")
        elif args.action == "delete":
            admin.delete_webhook(args.webhook_id)
            print(f"webhook {args.webhook_id} deleted")
        elif args.action == "deliveries":
            _print_deliveries(admin.deliveries(failed_only=args.failed))
        elif args.action == "redeliver":
            run_id = admin.redeliver(args.delivery_id)
            from worker.webhooks import send

            send(run_id, args.delivery_id)
            print(f"delivery {args.delivery_id} queued again")
    finally:
        admin.close()


def _print_deliveries(deliveries: list[dict[str, object]]) -> None:
    def at(moment: object) -> str:
        return f"{moment:%Y-%m-%d %H:%M:%S}" if moment is not None else "-"

    print(f"{'delivery':<36} {'webhook':>7} {'run':>8} {'state':<9} {'tries':>5} {'status':>6} "
          f"{'created':<19} {'next try':<19} {'delivered':<19} last error")
    for d in deliveries:
        print(f"{d['id']!s:<36} {d['webhook_id']!s:>7} {d['run_id']!s:>8} {d['state']!s:<9} {d['attempts']!s:>5} "
              f"{d['last_status'] or '-'!s:>6} {at(d['created_at']):<19} "
              f"{at(d['next_attempt_at']) if d['state'] == 'pending' else '-':<19} {at(d['delivered_at']):<19} "
              f"{str(d['last_error'] or '')[:100]}")
    print(f"{len(deliveries)} deliveries", file=sys.stderr)


def _check_dedupe_window() -> None:
    """Refuse to start what claims or forgets operation ids with a dedupe window a redelivery could outlast."""
    from worker.lifecycle import LifecycleError, check_dedupe_window

    try:
        check_dedupe_window(get_settings())
    except LifecycleError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        sys.exit(1)


def _days(value: str) -> str:
    if value != "default" and not value.isdigit():
        raise argparse.ArgumentTypeError("a number of days (0: forever), or `default`")
    return value


def _status(args: argparse.Namespace) -> None:
    from ingest.status import main as status

    status(get_settings(), args.watch, args.json)


def _dlq_list(args: argparse.Namespace) -> None:
    from ingest.admin import Admin

    letters = Admin(get_settings()).dead_letters(include_applied=args.all)
    if args.json:
        print(orjson.dumps(letters, option=orjson.OPT_INDENT_2, default=str).decode())
        return
    print(f"{'id':>6} {'state':<9} {'failed':>6} {'kind':<16} {'run':>8} {'thread':>8} {'first failed':<20} error")
    for d in letters:
        print(f"{d['id']:>6} {d['state']:<9} {d['failures']:>6} {d['kind']:<16} {d['run_id'] or '':>8} "
              f"{d['thread_id'] or '':>8} {d['created_at']:%Y-%m-%d %H:%M:%S}  {d['error'][:100]}")
    print(f"{len(letters)} dead letter(s)", file=sys.stderr)


def _dlq_replay(args: argparse.Namespace) -> None:
    from ingest.admin import Admin

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"\rreplayed {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    if not args.ids and not args.all:
        print("ingest: name the dead letters to replay, or --all", file=sys.stderr)
        sys.exit(2)
    count = Admin(get_settings()).replay(args.ids or None, progress)
    print(f"{count} operation(s) queued again; `ingest dlq list --all` shows which were applied")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ingest", description=__doc__)
    sub = p.add_subparsers(required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(required=True)
    db.add_parser("upgrade", help="create the database if missing, then migrate it").set_defaults(func=_db_upgrade)

    api = sub.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1, help="server processes")
    api.add_argument("--tls-cert", help="certificate file (PEM); serve HTTPS, which the testmo CLI requires")
    api.add_argument("--tls-key", help="private key file (PEM)")
    api.set_defaults(func=_api)

    worker = sub.add_parser("worker", help="apply queued operations to the database")
    worker.add_argument("--concurrency", type=int, help="worker processes (default INGEST_WORKER_CONCURRENCY)")
    # Every interface by default, as a container needs (its port is published or not by the orchestrator);
    # on a machine of its own, `make run` binds it to 127.0.0.1.
    worker.add_argument("--metrics-host", default="0.0.0.0", help="address of /metrics and /healthz")
    worker.add_argument("--metrics-port", type=int, default=9101, help="serves /metrics and /healthz")
    # Both by default: a delivery task only hands its POSTs to threads of the process (worker/webhooks.py), so
    # a receiver that hangs never holds up applying. `webhooks` runs delivery workers apart, with `ops` beside.
    worker.add_argument("--queues", choices=("all", "ops", "webhooks"), default="all",
                        help="serve the ops queue (INGEST_QUEUE), the webhook deliveries (INGEST_WEBHOOK_QUEUE), "
                             "or both (default)")
    worker.set_defaults(func=_worker)

    admin = sub.add_parser("admin", help="projects, tokens, configs, milestones, webhooks").add_subparsers(
        required=True)
    project = admin.add_parser("project").add_subparsers(required=True)
    create = project.add_parser("create", help="create a project; prints its id")
    create.add_argument("name")
    create.add_argument("--exist-ok", action="store_true", help="print the id of an existing project")
    create.set_defaults(func=_admin, what="project")
    retention = project.add_parser("retention", help="days a project's completed runs are kept (0: forever)")
    retention.add_argument("--project", type=int, required=True)
    retention.add_argument("days", type=_days, help="days, 0 for forever, or `default` for INGEST_RETENTION_DAYS")
    retention.set_defaults(func=_project_retention)
    for what in ("config", "milestone"):
        named = admin.add_parser(what).add_subparsers(required=True)
        create = named.add_parser("create", help=f"create a {what} in a project; prints its id")
        create.add_argument("--project", type=int, required=True)
        create.add_argument("name")
        create.set_defaults(func=_admin, what=what)
    token = admin.add_parser("token").add_subparsers(required=True)
    create = token.add_parser("create", help="create a token for a user (created if needed); prints it")
    create.add_argument("--user", required=True)
    create.add_argument("--project", type=int, action="append", required=True, help="grant access; repeatable")
    create.set_defaults(func=_admin, what="token", action="create")
    revoke = token.add_parser("revoke", help="revoke a token")
    revoke.add_argument("token")
    revoke.set_defaults(func=_admin, what="token", action="revoke")
    run = admin.add_parser("run").add_subparsers(required=True)
    complete = run.add_parser("complete", help="complete a run now, with what has been applied")
    complete.add_argument("run_id", type=int)
    complete.set_defaults(func=_run_complete)
    delete = run.add_parser("delete", help="remove a run, open or not, and everything of it")
    delete.add_argument("run_id", type=int)
    delete.set_defaults(func=_run_delete)
    webhook = admin.add_parser("webhook", help="POSTs to receivers when a project's runs complete").add_subparsers(
        required=True)
    create = webhook.add_parser("create", help="a webhook of a project; prints its id (and its secret if generated)")
    create.add_argument("--project", type=int, required=True)
    create.add_argument("url", help="an http:// or https:// URL")
    create.add_argument("--secret", help="the HMAC key of X-Ingest-Signature-256 (default: a new random one)")
    create.set_defaults(func=_webhook, action="create")
    webhook.add_parser("list", help="every webhook").set_defaults(func=_webhook, action="list")
    delete = webhook.add_parser("delete", help="remove a webhook and the record of its deliveries")
    delete.add_argument("webhook_id", type=int)
    delete.set_defaults(func=_webhook, action="delete")
    listing = webhook.add_parser("deliveries", help="the latest deliveries, newest first")
    listing.add_argument("--failed", action="store_true", help="only those that failed for good")
    listing.set_defaults(func=_webhook, action="deliveries")
    redeliver = webhook.add_parser("redeliver", help="try a failed (or delivered) delivery again, with a fresh "
                                   "retry window; the same body and delivery id")
    redeliver.add_argument("delivery_id")
    redeliver.set_defaults(func=_webhook, action="redeliver")
    store = admin.add_parser("retention", help="removing what is past its retention").add_subparsers(required=True)
    apply = store.add_parser("apply", help="a retention pass now (the workers make one daily); prints what went")
    apply.add_argument("--dry-run", action="store_true", help="print what would go, remove nothing")
    apply.set_defaults(func=_retention_apply)

    status = sub.add_parser("status", help="queue depth, rates, workers, dead letters and stuck runs")
    status.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                        help="refresh every SECONDS (default 2) until interrupted")
    status.add_argument("--json", action="store_true", help="one JSON object per reading")
    status.set_defaults(func=_status)

    dlq = sub.add_parser("dlq", help="operations that could not be applied").add_subparsers(required=True)
    listing = dlq.add_parser("list", help="dead letters not yet applied (with --all, all of them)")
    listing.add_argument("--all", action="store_true")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_dlq_list)
    replay = dlq.add_parser("replay", help="queue dead-lettered operations again, once their cause is fixed")
    replay.add_argument("ids", type=int, nargs="*")
    replay.add_argument("--all", action="store_true", help="every dead letter not yet applied")
    replay.set_defaults(func=_dlq_replay)
    return p


def main(argv: list[str] | None = None) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_format)
    args = parser().parse_args(argv)
    from ingest.admin import AdminError

    try:
        args.func(args)
    except AdminError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
