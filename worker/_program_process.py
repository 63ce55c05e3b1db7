"""A registered program in its worker process: the operator's ``train(run, params)`` called
with a :class:`trainbus.sdk.Run` already attached to the job the server launched (with the
job's credential, over the worker protocol), its output captured as ``log`` events and in
the job's log file (``worker/_output.py``).

Commands reach the program at the batch boundaries its loop gives the run
(``run.epochs()``, ``run.batches()``, ``run.check()``); SIGTERM, which the supervisor sends
to a stop that was not answered in time, raises ``KeyboardInterrupt`` in the program and the
run ends interrupted; an exception ends it failed, with its traceback's last lines.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import select
import signal
import sys
import threading
import traceback

from trainbus.sdk import Run, SDKError

from ._output import LogLimits, OutputCapture
from ._program_spec import ProgramSpec
from ._registry import default_registry
from ._worker_process import EXIT_INTERRUPTED, EXIT_REFUSED, EXIT_UNDELIVERED, WorkerSetup

__all__ = ["LOG_FILE_NAME", "run_program"]

logger = logging.getLogger(__name__)

LOG_FILE_NAME = "output.log"
"""A program job's log file in its folder: every line the program wrote to its stdout and
stderr (``GET /jobs/{id}/log``)."""
STDOUT_FILE_NAME = "stdout.log"
"""Where the program's fd 1 writes (its fd 2 writes to the worker's log)."""


def run_program(setup: WorkerSetup, limits: LogLimits | None = None) -> int:
    """Run the program ``setup.spec`` names until it returns; the worker's exit code (0 once
    the server has the result)."""
    try:
        spec = ProgramSpec.model_validate(setup.spec)
        entry = default_registry().program(spec.program.name)
        params = entry.params.model_validate(spec.program.params)
    except Exception as error:  # a plugin removed or changed since the job was submitted
        print(f"trainbus worker: the program cannot run: {error}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # KeyboardInterrupt: interrupted
    _end_with_server(setup.server_pid)
    run = Run.for_launched_job(
        setup.job_id,
        worker_url=setup.url,
        worker_token=setup.token,
        name=spec.name,
        checkpoint_dir=setup.job_dir / "program",
        early_stop=spec.early_stop.model_dump(),
        lr_plateau=spec.lr_plateau.model_dump(),
        fit_epoch_end_timeout=setup.fit_epoch_end_timeout,
        # a resumed program job runs train again from the start: its history is rewound
        from_step=0 if setup.resumed else None,
    )
    try:
        run.start()
    except SDKError as error:
        print(f"trainbus worker: {error}", file=sys.stderr)
        return EXIT_REFUSED
    # a crash's report (a segmentation fault in native code) gives the crashed thread's stack
    # only, so that it fits the failure's stderr tail
    crash_log = open(setup.log_path, "ab", buffering=0)  # noqa: SIM115 - for the process's life
    faulthandler.enable(file=crash_log, all_threads=False)
    capture = OutputCapture(
        log_path=setup.job_dir / LOG_FILE_NAME,
        stdout_path=setup.job_dir / STDOUT_FILE_NAME,
        stderr_path=setup.log_path,
        publish=run.log_output,
        limits=limits or LogLimits(),
    )
    capture.start()
    outcome: str | None = None
    reason: str | None = None
    failure: BaseException | None = None
    try:
        entry.train(run, params)
    except KeyboardInterrupt:
        outcome, reason = "interrupted", "the worker was told to end (SIGTERM)"
    except SystemExit as exit_request:
        if exit_request.code not in (None, 0):
            print(f"the program exited with {exit_request.code!r}", file=sys.stderr)
            failure = exit_request
    except BaseException as error:  # the program's: the job fails with it
        traceback.print_exc()
        failure = error
    finally:
        statistics = capture.stop()
    logger.info("job %s: the program's output: %s", setup.job_id, statistics)
    if failure is not None:
        delivered = run.finish("failed", error=failure)
    else:
        delivered = run.finish(outcome, reason=reason)
    if delivered:
        return 0
    return EXIT_INTERRUPTED if outcome == "interrupted" else EXIT_UNDELIVERED


def _end_with_server(pid: int) -> None:
    """Exit at once when the server's process is gone: the program keeps its own state (a
    resumed program job runs its ``train`` again), so there is none to save here."""

    def watch() -> None:
        try:
            handle = os.pidfd_open(pid)
        except (AttributeError, OSError):
            return  # the fork server's death signal (SIGTERM) still ends the program
        select.select([handle], [], [])
        print(f"trainbus worker: the server (pid {pid}) is gone; the worker ends", file=sys.stderr)
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)

    threading.Thread(target=watch, name="trainbus-server-watch", daemon=True).start()
