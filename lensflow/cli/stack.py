"""Verbs that run the whole thing: ``up``, ``demo``, ``simulate``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from lensflow.cli.config import load_config
from lensflow.cli.dashboard import DEFAULT_PORT as DEFAULT_DASHBOARD_PORT
from lensflow.cli.dashboard import start_dashboard
from lensflow.cli.output import CliError, add_json_flag, emit
from lensflow.demo import DemoOptions, ensure_model, run_demo, summary_text
from lensflow.simulate import Burst, Plan, Simulator
from lensflow.stack import DEFAULT_LOG_DIR, EmbeddedStack
from lensflow_core.settings import Config


def register(subparsers) -> None:
    _register_up(subparsers)
    _register_demo(subparsers)
    _register_simulate(subparsers)


def _register_up(subparsers) -> None:
    up = subparsers.add_parser(
        "up", help="start the embedded stack in the foreground; Ctrl-C stops all of it"
    )
    _stack_options(up)
    up.add_argument(
        "--train-every",
        type=float,
        default=None,
        metavar="S",
        help="run a training round every S seconds (the PingSource stand-in)",
    )
    up.add_argument(
        "--kafka",
        metavar="BOOTSTRAP",
        help="use this running (durable) Kafka instead of starting the in-memory one",
    )
    up.add_argument(
        "--s3",
        metavar="URL",
        help="use this running (durable) S3/MinIO endpoint instead of starting moto",
    )
    up.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="on Ctrl-C/SIGTERM, how long to keep dispatching what the broker already "
        "acknowledged before stopping (60)",
    )
    up.add_argument(
        "--log-dir",
        type=Path,
        default=DEFAULT_LOG_DIR,
        metavar="DIR",
        help="where each process logs (var/logs in the checkout)",
    )
    up.add_argument(
        "--seed-model",
        action="store_true",
        help="with an empty model store, train a first model on synthetic scenes (as the demo)",
    )
    add_json_flag(up)
    up.set_defaults(func=cmd_up)


def _register_demo(subparsers) -> None:
    demo = subparsers.add_parser(
        "demo", help="start the stack, seed a model, fly simulated drones, summarise, stop"
    )
    # the demo's labels come through the uncertainty queue, not straight from the drones
    _flight_options(demo, rate=3.0, default_bursts=["10:20:15"], labelled_fraction=0.0)
    _stack_options(demo, idle=10.0)
    demo.add_argument(
        "--no-train",
        action="store_true",
        help="skip the training round in the middle of the flight",
    )
    demo.add_argument(
        "--drain-timeout",
        type=float,
        default=90.0,
        metavar="S",
        help="how long to wait for the backlog after the flight (90)",
    )
    add_json_flag(demo)
    demo.set_defaults(func=cmd_demo)


def _register_simulate(subparsers) -> None:
    simulate = subparsers.add_parser("simulate", help="drone fleet load generator")
    _flight_options(simulate, rate=5.0, default_bursts=[])
    simulate.add_argument("--size", default="640x480", metavar="WxH", help="photo size")
    simulate.add_argument("--prefix", default="drones", help="key prefix in the image bucket")
    add_json_flag(simulate)
    simulate.set_defaults(func=cmd_simulate)


def _stack_options(parser: argparse.ArgumentParser, idle: float = 30.0) -> None:
    parser.add_argument(
        "--max-replicas", type=int, default=4, metavar="N", help="most predict replicas (4)"
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=idle,
        metavar="S",
        help=f"scale predict to zero after S idle seconds ({idle:g})",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=DEFAULT_DASHBOARD_PORT,
        metavar="P",
        help=f"the live dashboard's port on 127.0.0.1 ({DEFAULT_DASHBOARD_PORT}; taken: any free one)",
    )
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the dashboard")


def _flight_options(
    parser: argparse.ArgumentParser,
    rate: float,
    default_bursts: list[str],
    labelled_fraction: float = 0.1,
) -> None:
    parser.add_argument("--drones", type=int, default=4, metavar="N", help="drones (4)")
    parser.add_argument(
        "--rate",
        type=float,
        default=rate,
        metavar="R",
        help=f"photos per second, all drones together ({rate:g})",
    )
    parser.add_argument(
        "--burst",
        action="append",
        default=None,
        metavar="FACTOR:START:LENGTH",
        help="multiply the rate for a while, e.g. 10:20:20 (repeatable"
        + (f"; default {' '.join(default_bursts)}" if default_bursts else "")
        + "); --burst none for no burst",
    )
    parser.set_defaults(default_bursts=default_bursts)
    parser.add_argument(
        "--duration", type=float, default=60.0, metavar="S", help="seconds of flight (60)"
    )
    parser.add_argument(
        "--labelled-fraction",
        type=float,
        default=labelled_fraction,
        metavar="F",
        help=f"share of photos also stored as labelled training data ({labelled_fraction})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the photos and keys (0)")


def _bursts(args: argparse.Namespace):
    texts = args.default_bursts if args.burst is None else args.burst
    try:
        return tuple(Burst.parse(t) for t in texts if t.lower() != "none")
    except ValueError as exc:
        raise CliError(str(exc)) from None


@contextlib.contextmanager
def _signals_stop() -> Iterator[None]:
    """SIGTERM stops like Ctrl-C; while the stack stops, a second Ctrl-C is ignored so
    that stopping finishes and leaves no process behind."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _quiet_console() -> None:
    """The stack logs INFO to var/logs/stack.log; the terminal shows warnings only."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.level < logging.WARNING:
            handler.setLevel(logging.WARNING)


def _start_stack(**kwargs):
    load_config()  # a bad setting fails here with one line
    _quiet_console()
    stack = EmbeddedStack(None, **kwargs)
    try:
        stack.start()
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        raise CliError(f"the embedded stack did not start: {exc} (logs: {stack.log_dir})") from None
    return stack


def cmd_up(args: argparse.Namespace) -> int:
    external = _use_external_servers(args)
    with _signals_stop():
        stack = _start_stack(
            max_replicas=args.max_replicas,
            idle_s=args.idle,
            train_every_s=args.train_every,
            external=external,
            log_dir=args.log_dir,
        )
        dashboard = None
        stopping = False
        try:
            model = _model_at_start(stack, args.seed_model, quiet=args.json)
            if not args.no_dashboard:
                dashboard = start_dashboard(stack.config, stack, args.dashboard_port)
            info = {
                **stack.describe(),
                "exports": stack.exports(),
                "serving": model,
                "dashboard": dashboard.url if dashboard else None,
            }
            emit(args, info, _up_text(stack, info))
            sys.stdout.flush()
            threading.Event().wait()  # until Ctrl-C or SIGTERM
        except KeyboardInterrupt:
            stopping = True
        finally:
            if stopping:
                _drain(stack, args.drain_timeout, quiet=args.json)
            with _uninterruptible():
                if dashboard is not None:
                    dashboard.stop()
                stack.stop(count_left=stopping)
    if stopping:
        _check_drained(stack)
    return 0


def _use_external_servers(args: argparse.Namespace) -> set[str]:
    """``--kafka``/``--s3``: point the configuration (and so every replica) at them."""
    import os

    external = set()
    if args.kafka:
        os.environ["LENSFLOW_KAFKA_BOOTSTRAP"] = args.kafka
        external.add("kafka")
    if args.s3:
        os.environ["LENSFLOW_S3_ENDPOINT"] = args.s3
        external.add("s3")
    return external


def _drain(stack, timeout_s: float, quiet: bool) -> None:
    """Stop means drained or refused: dispatch what the broker acknowledged, showing
    how much is left, for at most ``timeout_s``; a second Ctrl-C cuts it short."""
    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    say(f"stopping: finishing what the broker acknowledged (at most {timeout_s:g} s)...")
    shown: list[int] = []

    def progress(left: int) -> None:
        if not shown or left != shown[-1]:
            say(f"  {left} acknowledged upload(s) left")
            shown.append(left)

    try:
        stack.drain(timeout_s, progress)
    except KeyboardInterrupt:
        say("  interrupted: stopping now")
    except Exception as exc:  # the count after the stop says what is left
        say(f"  cannot drain: {exc}")


def _check_drained(stack) -> None:
    left = stack.left_undone
    durable = "kafka" in stack.external
    if left == 0:
        return
    if left is None:
        raise CliError(
            "stopped, but the broker could not say whether acknowledged uploads were left "
            + ("undone (they stay in the broker)" if durable else "undone (possibly lost)")
        )
    raise CliError(
        f"stopped with {left} acknowledged upload(s) neither predicted nor dead-lettered: "
        + (
            f"they stay in the broker at {stack.config.kafka_bootstrap} for the next run"
            if durable
            else "lost with the in-memory broker (raise --drain-timeout, or run durably "
            "with --kafka/--s3)"
        )
    )


def _model_at_start(stack, seed: bool, quiet: bool) -> str | None:
    """The version served; with ``seed`` and an empty store, a first model trained now.
    An empty store is said out loud: events would otherwise wait on 503s and end up
    as dead letters (replayable: ``lensflow dlq replay --reason "no model"``)."""
    from lensflow_model_store import ModelStore, ModelStoreError

    say = (lambda text: None) if quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    try:
        pointer = ModelStore.from_config(stack.config).current()
    except ModelStoreError as exc:
        say(f"warning: cannot read the model store: {exc}")
        return None
    if pointer is not None:
        return pointer.version
    if seed:
        try:
            return ensure_model(stack, say)["version"]
        except Exception as exc:  # one line, as every verb fails
            raise CliError(f"could not seed a first model: {exc}") from None
    say(
        "warning: the model store is empty: uploads are answered 503 (no model yet), retried, "
        "then dead-lettered as replayable. Start with --seed-model, or publish one with "
        "`lensflow models publish FILE --labels FILE --promote`, then "
        '`lensflow dlq replay --reason "no model"`.'
    )
    return None


def _notify_text(rule, topic: str) -> str:
    """Which uploads become events, in one line."""
    if isinstance(rule, str):
        return rule
    keys = f"{rule['prefix']}*{rule['suffix']}" if rule["prefix"] or rule["suffix"] else "every key"
    return (
        f"any S3 client's new object in {', '.join(rule['buckets'])} ({keys}) -> topic {topic}, "
        "as MinIO's bucket notification"
    )


def _up_text(stack, info: dict) -> str:
    started = ", ".join(info["started"]) or "nothing"
    lines = [
        "lensflow embedded stack is up (Ctrl-C stops all of it)",
        f"  kafka      {info['kafka']}" + ("  (external)" if "kafka" in info["external"] else ""),
        f"  s3         {info['s3']}" + ("  (external)" if "s3" in info["external"] else ""),
        f"  buckets    images {', '.join(info['image_buckets'])}; train {info['train_bucket']}; "
        f"model {info['model']}",
        f"  topics     {', '.join(info['topics'])}",
        f"  events     {_notify_text(info['notifications'], info['topics'][0])}",
        f"  predict    scale to zero: started on the first event, up to "
        f"{stack.pool.max_replicas} replicas, stopped after {stack.pool.idle_s:g} s idle",
        "  training   "
        + (
            f"a round every {stack.timer.every_s:g} s"
            if stack.timer
            else "on demand (`lensflow train --once`)"
        ),
        f"  archive    s3://{stack.config.archive_bucket}/predictions/ (Parquet; "
        "`lensflow predictions query SQL`)",
        f"  serving    {info['serving'] or 'NO MODEL YET: uploads wait, then dead-letter (--seed-model)'}",
        f"  dashboard  {info['dashboard'] or 'off'}",
        f"  started    {started}; logs in {info['logs']}",
        *(
            [
                f"  in memory  {', '.join(info['in_memory'].values())}: a stop or crash loses "
                "every record, offset and object there; for durable servers use --kafka and "
                "--s3 (README, 'Durable servers')"
            ]
            if info["in_memory"]
            else []
        ),
        "",
        "In a second shell (credentials: the defaults, or your LENSFLOW_S3_* variables):",
    ]
    lines += [f"  export {name}={value}" for name, value in info["exports"].items()]
    lines += [
        "  .venv/bin/lensflow simulate --duration 20",
        "  .venv/bin/lensflow predictions tail --follow",
    ]
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    options = DemoOptions(
        duration_s=args.duration,
        drones=args.drones,
        rate=args.rate,
        bursts=_bursts(args),
        labelled_fraction=args.labelled_fraction,
        train_mid_flight=not args.no_train,
        drain_timeout_s=args.drain_timeout,
        max_replicas=args.max_replicas,
        idle_s=args.idle,
        seed=args.seed,
    )
    _check_options(options.drones, options.rate, options.duration_s, options.labelled_fraction)
    live = not args.json and sys.stdout.isatty()
    say = (lambda text: None) if args.json else (lambda text: print(text, flush=True))
    stack = dashboard = None
    with _signals_stop():
        try:
            say("starting the embedded stack (S3, Kafka, dispatcher, scale-to-zero predict)")
            stack = _start_stack(idle_s=options.idle_s, max_replicas=options.max_replicas)
            if not args.no_dashboard:
                dashboard = start_dashboard(stack.config, stack, args.dashboard_port)
                say(f"live dashboard: {dashboard.url}")
            summary = run_demo(stack, options, live=live, say=say)
            if dashboard is not None:
                summary["dashboard"] = dashboard.url
        except KeyboardInterrupt:
            say("interrupted: stopping everything")
            return 130
        except CliError:
            raise
        except Exception as exc:
            raise CliError(f"demo failed: {exc} (logs: {stack.log_dir})") from None
        finally:
            with _uninterruptible():
                if dashboard is not None:
                    dashboard.stop()
                if stack is not None:
                    stack.stop()
    emit(args, summary, summary_text(summary))
    return 0 if summary["missing"] == 0 else 1


def _check_options(drones: int, rate: float, duration: float, fraction: float) -> None:
    if drones < 1 or rate <= 0 or duration <= 0:
        raise CliError("--drones, --rate and --duration must be positive")
    if not 0 <= fraction <= 1:
        raise CliError("--labelled-fraction is between 0 and 1")


def cmd_simulate(args: argparse.Namespace) -> int:
    _check_options(args.drones, args.rate, args.duration, args.labelled_fraction)
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise CliError(f"--size is WIDTHxHEIGHT, like 640x480, not {args.size!r}") from None
    plan = Plan(
        drones=args.drones,
        rate=args.rate,
        duration_s=args.duration,
        bursts=_bursts(args),
        labelled_fraction=args.labelled_fraction,
        size=(width, height),
        seed=args.seed,
        prefix=args.prefix.strip("/") or "drones",
    )
    config = load_config()
    _check_reachable(config)
    simulator = Simulator(config, plan)
    stop = threading.Event()
    with _signals_stop():
        try:
            if args.json or not sys.stderr.isatty():
                simulator.prepare()
                result = simulator.run(stop)
            else:
                result = _simulate_with_progress(simulator, stop)
        except KeyboardInterrupt:
            stop.set()
            return 130
    data = result.to_dict()
    text = (
        f"{result.uploaded} of {result.planned} photos uploaded by {plan.drones} drones in "
        f"{result.duration_s:.1f} s ({result.rate:.1f}/s, peak planned "
        f"{result.peak_planned_rate:g}/s); {result.labelled} stored as labelled data"
        + (f"; {result.errors} errors, last: {result.last_error}" if result.errors else "")
    )
    emit(args, data, text)
    return 0 if result.errors == 0 else 1


def _simulate_with_progress(simulator, stop: threading.Event):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("rendering photos", total=None, rate="")
        simulator.prepare()
        plan = simulator.plan
        bar.update(task, description=f"{plan.drones} drones", total=len(plan.schedule()))

        def show(progress) -> None:
            t = min(progress.elapsed_s, plan.duration_s)
            burst = " burst" if plan.rate_at(t) > plan.rate else ""
            bar.update(
                task,
                completed=progress.uploaded,
                rate=f"{plan.rate_at(t):g}/s{burst}  errors {progress.errors}",
            )

        return simulator.run(stop, on_progress=show)


def _check_reachable(config: Config) -> None:
    """Fail with one line if the image bucket or the broker is not there."""
    from botocore.exceptions import BotoCoreError, ClientError

    from lensflow_core.s3 import s3_client

    bucket = config.image_buckets[0]
    try:
        s3_client(config, timeout_s=5, retries=0).head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as exc:
        raise CliError(
            f"image bucket {bucket} at {config.s3_endpoint or 'AWS S3'} is not "
            f"reachable ({exc}); is `lensflow up` running?"
        ) from None
    from lensflow_core.kafka import KafkaSetupError
    from lensflow_eventing.topics import ensure_topics, topic_specs

    try:
        ensure_topics(config.kafka, topic_specs(*config.topics), timeout_s=5)
    except KafkaSetupError as exc:
        raise CliError(str(exc)) from None
    except Exception as exc:
        raise CliError(
            f"Kafka at {config.kafka_bootstrap} is not reachable ({exc}); is `lensflow up` running?"
        ) from None
