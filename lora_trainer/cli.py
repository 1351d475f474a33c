"""Command-line entry: parse flags, claim stdout for events, run preflight or training, map errors to exit codes.

Heavy imports (torch, diffusers) happen only inside the training branch, so ``--help`` and
``--validate-only`` stay fast and never pay for them.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
import traceback
import warnings

from . import __version__
from .contract.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_OK, ConfigError, Interrupted, TrainerError
from .contract.events import EventStream, claim_stdout

log = logging.getLogger("train_lora")

DESCRIPTION = """\
Train a LoRA for Stable Diffusion 1.x, 2.x or SDXL from a JSON config.

Progress is written to stdout as newline-delimited JSON events (see events_schema.json and the README), and
nothing else; on a terminal (or with --progress human) stdout shows a progress bar instead, never mixed with
JSON. Logs, warnings and tracebacks go to stderr, and so does this help."""


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, _, meaning in EXIT_CODES)
    return f"""\
examples:
  python3 train_lora.py --config config.json                  train
  python3 train_lora.py --config config.json --validate-only  check config, dataset, model and output in ~1 s
  python3 train_lora.py --config config.json --resume         continue from the newest checkpoint
  python3 train_lora.py --config config.json 2>train.log | my-parser   events on stdout, logs in a file

exit codes:
{codes}
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit; we want an error event too
        raise ConfigError(f"invalid command line: {message}",
                          [{"path": "(command line)", "value": " ".join(sys.argv[1:]), "message": message,
                            "allowed": "see --help"}], hint="run with --help for the list of flags")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train_lora.py", description=DESCRIPTION, epilog=_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="PATH",
                   help="JSON config file (schema: config_schema.json). Relative paths inside it are relative to the file.")
    p.add_argument("--validate-only", action="store_true",
                   help="check the config, dataset, base model and output folder without loading a model; "
                        "emit one 'validation' event and exit (0 if usable, 2 if not)")
    p.add_argument("--resume", action="store_true",
                   help="shorthand for \"resume\": \"auto\": continue from the newest valid checkpoint in output_path")
    p.add_argument("--run-id", metavar="ID", help="run id to put in every event (default: random)")
    p.add_argument("--progress", choices=("auto", "json", "human"), default="auto",
                   help="stdout format: json = the event stream; human = progress bar and readable lines; "
                        "auto (default) = json unless stdout is a terminal")
    p.add_argument("--debug", action="store_true", help="debug logs and Python tracebacks on stderr")
    p.add_argument("--version", action="version", version=f"train_lora {__version__}")
    return p


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(stream=sys.stderr, level=logging.DEBUG if debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.captureWarnings(True)  # library warnings become log records on stderr
    if not debug:
        # Library chatter (diffusers/transformers deprecations) is noise for an operator; --debug shows it.
        # httpx logs every request URL of a hub download at INFO.
        for name in ("diffusers", "transformers", "accelerate", "peft", "PIL", "huggingface_hub", "py.warnings",
                     "httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def _report(events: EventStream, exc: TrainerError) -> None:
    events.emit("error", code=exc.code, exit_code=exc.exit_code, message=exc.message, hint=exc.hint,
                details=exc.details if exc.details is not None else {})
    log.error("%s (%s, exit %d)", exc.message, exc.code, exc.exit_code)
    for problem in getattr(exc, "problems", [])[:50]:
        log.error("  %s: %s (got %r; allowed: %s)", problem.get("path"), problem.get("message"),
                  problem.get("value"), problem.get("allowed"))
    if exc.hint:
        log.error("hint: %s", exc.hint)


def _validate_only(cfg, config_warnings, events: EventStream, started: float) -> int:
    from .preflight.run import run_preflight

    result = run_preflight(cfg, list(config_warnings))
    events.emit("validation", ok=result.ok, errors=result.errors, warnings=result.warnings,
                summary=result.summary, duration_s=round(time.monotonic() - started, 3))
    for w in result.warnings:
        log.warning("%s: %s", w.get("code"), w.get("message"))
    if not result.ok:
        raise ConfigError(f"validation found {len(result.errors)} error(s)", result.errors,
                          hint="fix the errors listed in the validation event")
    log.info("validation passed (%d warning(s))", len(result.warnings))
    return EXIT_OK


def _train(cfg, config_warnings, events: EventStream, args) -> int:
    from .runtime.run_lock import OutputLock

    lock = OutputLock(cfg.output_path)
    if os.environ.get("RANK", "0") in ("", "0"):  # the other ranks write nothing without rank 0
        lock.acquire(events.run_id)  # before anything is read or written (or torch imported): a second run
        # touches nothing and is refused at once
    from .runtime.cpu_load import prepare_openmp

    prepare_openmp()  # before torch is imported: OpenMP reads its wait policy once, when it loads
    from .runtime.signals import GracefulStop
    from .training.trainer import Trainer

    stop = GracefulStop()
    stop.install()
    for w in config_warnings:
        events.emit("warning", **w)
    trainer = Trainer(cfg, events, stop=stop, debug=args.debug)
    try:
        trainer.setup()
        trainer.train()
        trainer.save_final()
    finally:
        trainer.cleanup()
        lock.release()
    return EXIT_OK


def _out_of_memory(exc: BaseException, phase: str):
    """An OutOfMemoryError for an allocation failure outside the training loop (which classifies its own)."""
    if not isinstance(exc, MemoryError):
        if "torch" not in sys.modules:  # nothing allocated big before torch; and never import it here
            return None
        from .training.guards import is_out_of_memory

        if not is_out_of_memory(exc):
            return None
    from .contract.errors import OutOfMemoryError

    where = "GPU" if "cuda" in str(exc).lower() else "host"
    first = (str(exc).splitlines() or [""])[0][:300] or type(exc).__name__
    return OutOfMemoryError(f"out of {where} memory while {phase.replace('_', ' ')}: {first}",
                            hint="a smaller model or resolution, cache_latents_to_disk / cache_text_embeddings_to_disk, "
                                 "cache_host_budget_gb, or more memory; validate-only's summary.memory shows the plan",
                            details={"where": where.lower(), "phase": phase})


def _wants_human(args: list[str]) -> bool:
    """Decided before argparse runs, because stdout must be claimed first; argparse validates the value."""
    mode = "auto"
    for i, a in enumerate(args):
        if a == "--progress" and i + 1 < len(args):
            mode = args[i + 1]
        elif a.startswith("--progress="):
            mode = a.split("=", 1)[1]
    if mode == "human":
        return True
    return mode == "auto" and sys.stdout.isatty()


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    raw_args = argv if argv is not None else sys.argv[1:]
    human = _wants_human(raw_args)
    out = claim_stdout()
    debug = "--debug" in raw_args
    _setup_logging(debug)
    # Under `accelerate launch`, every rank shares the launcher's stdout: only rank 0 may write events.
    main_rank = os.environ.get("RANK", "0") in ("", "0")
    if human:
        from .contract.human import HumanProgress

        events = EventStream(None, on_event=HumanProgress(out) if main_rank else None)
    else:
        events = EventStream(out, enabled=main_rank)
    if os.environ.get("TRAIN_LORA_RUN_ID"):
        events.run_id = os.environ["TRAIN_LORA_RUN_ID"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help / --version: argparse printed to (our redirected) stdout
        return int(exc.code or 0)
    except ConfigError as exc:
        _report(events, exc)
        return exc.exit_code
    if args.run_id:
        events.run_id = args.run_id
    try:
        from .config.config import load_config

        cfg, config_warnings = load_config(args.config)
        if args.resume:
            import dataclasses

            cfg = dataclasses.replace(cfg, resume="auto")
        if args.validate_only:
            return _validate_only(cfg, config_warnings, events, started)
        return _train(cfg, config_warnings, events, args)
    except Interrupted as exc:
        # The trainer has already emitted `interrupted` with the checkpoint; this is the early-phase path.
        if not getattr(exc, "reported", False):
            events.emit("interrupted", signal=signal.Signals(exc.signum).name, step=None, checkpoint=None,
                        message=exc.message)
        log.warning("interrupted by %s", signal.Signals(exc.signum).name)
        return exc.exit_code
    except TrainerError as exc:
        if debug:
            traceback.print_exc()
        _report(events, exc)
        return exc.exit_code
    except KeyboardInterrupt:
        events.emit("interrupted", signal="SIGINT", step=None, checkpoint=None, message="interrupted")
        return 128 + int(signal.SIGINT)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: still an event, never silence
        oom = _out_of_memory(exc, events.phase)
        if oom is not None:  # outside a training step (loading, caching): still exit 6, with what to lower
            _report(events, oom)
            return oom.exit_code
        if debug:
            traceback.print_exc()
        else:
            log.error("internal error: %s: %s (rerun with --debug for the traceback)", type(exc).__name__, exc)
        events.emit("error", code="internal_error", exit_code=EXIT_INTERNAL, message=f"{type(exc).__name__}: {exc}",
                    hint="this is a bug in train_lora; rerun with --debug and report the traceback", details={})
        return EXIT_INTERNAL
    finally:
        events.stop_heartbeat()
