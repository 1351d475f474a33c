"""Error classes and the process exit codes a parent program can rely on.

The codes are part of the public contract (README, ``--help`` and events_schema.json list them):
a parent decides whether to retry, fix the config or report a crash from the code alone.
Interruption follows the shell convention 128 + signal number, so ``docker stop`` (SIGTERM) gives 143
and Ctrl-C (SIGINT) 130, exactly what a shell would report for a process killed by that signal.
"""
from __future__ import annotations

import signal
from typing import Any

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_CONFIG = 2  # argparse also exits 2 on a bad command line: both are "fix your input"
EXIT_DATASET = 3
EXIT_MODEL_LOAD = 4
EXIT_TRAINING = 5
EXIT_OUT_OF_MEMORY = 6
EXIT_IO = 7
EXIT_BUSY = 8  # not an input error: the same config can be retried once the other run has finished
EXIT_SIGINT = 128 + int(signal.SIGINT)  # 130
EXIT_SIGTERM = 128 + int(signal.SIGTERM)  # 143

# (exit code, error code used in events, one-line meaning); the README table and --help come from this.
EXIT_CODES: list[tuple[int, str, str]] = [
    (EXIT_OK, "ok", "success: training completed, or --validate-only found no errors"),
    (EXIT_INTERNAL, "internal_error", "unexpected internal error (a bug: please report it with --debug output)"),
    (EXIT_CONFIG, "config_invalid", "invalid command line or config (schema, cross-field checks, preflight errors)"),
    (EXIT_DATASET, "dataset_invalid", "dataset unusable (missing, empty, no readable images)"),
    (EXIT_MODEL_LOAD, "model_load_failed", "base model could not be found, downloaded or loaded"),
    (EXIT_TRAINING, "training_failed", "training failed (e.g. loss or gradients not finite)"),
    (EXIT_OUT_OF_MEMORY, "out_of_memory", "out of GPU or host memory"),
    (EXIT_IO, "io_error", "could not write outputs (disk full, permissions)"),
    (EXIT_BUSY, "output_in_use", "another run is using output_path (one run per output folder); nothing was touched"),
    (EXIT_SIGINT, "interrupted", "interrupted by SIGINT (Ctrl-C); a resumable checkpoint was saved if training had started"),
    (EXIT_SIGTERM, "interrupted", "interrupted by SIGTERM (docker stop); a resumable checkpoint was saved if training had started"),
]


class TrainerError(Exception):
    """An expected failure: reported as one ``error`` event and a documented exit code, never a traceback."""

    code = "internal_error"
    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None, details: Any = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details


class ConfigError(TrainerError):
    code, exit_code = "config_invalid", EXIT_CONFIG

    def __init__(self, message: str, problems: list[dict] | None = None, *, hint: str | None = None):
        super().__init__(message, hint=hint, details={"problems": problems or []})
        self.problems = problems or []


class DatasetError(TrainerError):
    code, exit_code = "dataset_invalid", EXIT_DATASET


class ModelLoadError(TrainerError):
    code, exit_code = "model_load_failed", EXIT_MODEL_LOAD


class TrainingError(TrainerError):
    code, exit_code = "training_failed", EXIT_TRAINING


class OutOfMemoryError(TrainerError):
    code, exit_code = "out_of_memory", EXIT_OUT_OF_MEMORY


class OutputError(TrainerError):
    code, exit_code = "io_error", EXIT_IO


class OutputBusyError(TrainerError):
    code, exit_code = "output_in_use", EXIT_BUSY


class Interrupted(TrainerError):
    """Raised after a graceful stop; carries the signal so the exit code can be 128 + signal."""

    code = "interrupted"

    def __init__(self, signum: int, message: str = "interrupted", **kw: Any):
        super().__init__(message, **kw)
        self.signum = signum
        self.exit_code = 128 + int(signum)
