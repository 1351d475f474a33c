"""A fork server for conftest.run_cli: one process per pytest worker that has imported the heavy third-party
libraries (torch, diffusers, transformers, peft, accelerate, matplotlib: about 9 s of CPU, nine tenths of a short
tiny run) and forks a child for each CLI run. The child is then what ``python train_lora.py ARGS`` is after its
imports: it takes the run's environment, umask, working directory, argv and stdout/stderr files, imports lora_trainer itself
(so what lora_trainer reads from the environment at import, e.g. the TRAIN_LORA_TEST_* hooks, is the run's), calls
the CLI's main, and ends as the interpreter would (non-daemon threads joined, atexit handlers, streams flushed).

Nothing of lora_trainer is imported here. conftest.run_cli uses the server only where a fresh process could not
differ: the run's environment equals the server's but for TRAIN_LORA_TEST_* / TRAIN_LORA_RUN_ID, and it is not
--validate-only (which must not import torch at all); everything else, and every run when
TRAIN_LORA_TESTS_FORKSERVER=0, starts ``python train_lora.py`` as before.

Protocol, one request at a time: a JSON line on stdin {argv, env, cwd, stdout, stderr}; the server answers the
child's pid, then its exit code as subprocess reports it (negative: killed by that signal), one line each.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _preload() -> None:
    import matplotlib.backends.backend_agg  # noqa: F401  (the report's figures: the object API, no pyplot)
    import matplotlib.figure  # noqa: F401
    import numpy  # noqa: F401
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import diffusers.models.autoencoders  # noqa: F401
    import diffusers.models.transformers  # noqa: F401
    import diffusers.models.unets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import transformers.modeling_utils  # noqa: F401


def _child(req: dict) -> int:
    import atexit
    import threading
    import traceback

    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    os.umask(req["umask"])
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    sys.argv = list(req["argv"])
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))  # as for `python train_lora.py`
    code = 0
    try:
        from lora_trainer.cli import main

        code = main()
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # an uncaught error: the traceback and exit 1, as the interpreter does
        traceback.print_exc()
        code = 1
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # the interpreter's own exit: non-daemon threads first, then atexit, then the streams
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def main() -> None:
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever an import prints must not reach the reply pipe
    _preload()
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                reply.close()
                code = _child(req)
            finally:
                os._exit(code)
        reply.write(f"{pid}\n")
        _, status = os.waitpid(pid, 0)
        reply.write(f"{os.waitstatus_to_exitcode(status)}\n")


if __name__ == "__main__":
    main()
