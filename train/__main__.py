"""``python -m train``: see ``python -m train --help``."""

from __future__ import annotations

import contextlib
import sys

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a temporary stop; rerunning the same command resumes


def main(argv: list[str] | None = None) -> int:
    from train.config import parse_config

    cfg = parse_config(argv)
    if cfg.compile_only:  # in a child process: libtpu stays out of this one
        from train.tpu_sizing import run_isolated

        return run_isolated(sys.argv[1:] if argv is None else argv, cfg.topology)
    from train.platforms import leave_out_absent_tpu

    leave_out_absent_tpu()
    from train.host_memory import retain_freed_memory

    retain_freed_memory()
    redeliver_interrupts()
    from train.compile_cache import enable

    enable(cfg.compile_cache)
    from resnet_flax.errors import WeightsError
    from train.errors import CheckpointWriteError, DataError, NonFiniteLoss, Preempted, RunError, WorkdirError
    from train.lock import workdir_lock
    from train.loop import run
    from train.storage import is_url

    if is_url(cfg.workdir):
        print(f"note: --workdir {cfg.workdir} is not locked (a bucket has no file locks); run one command per "
              "workdir", file=sys.stderr)
    try:
        # Multi-host runs share the workdir across machines, where a lock file would be shared too: unlocked.
        with contextlib.nullcontext() if cfg.multi_host or is_url(cfg.workdir) else workdir_lock(cfg.workdir):
            run(cfg)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return EXIT_PREEMPTED
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (DataError, RunError, WeightsError, WorkdirError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full or read-only disk while writing metrics.jsonl, curves.png or TensorBoard events
        print(f"error: cannot write {e.filename or 'to ' + str(cfg.workdir)} ({e.strerror or e}); free space or "
              "fix permissions, then rerun to resume from the last checkpoint", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _drop_leftovers_of_interrupted_work()
        print("interrupted: rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0


def redeliver_interrupts(hook=sys.unraisablehook) -> None:
    """A Ctrl-C that lands in a garbage-collection callback would be printed and swallowed, and the run would go
    on: deliver it to the main thread again instead."""
    import _thread
    import threading

    def unraisable(u) -> None:
        if isinstance(u.exc_value, KeyboardInterrupt):
            # Not interrupt_main() from here: on the main thread it raises inside this hook, whose exceptions
            # Python ignores as well. A timer thread asks for it once the hook has returned.
            threading.Timer(0.05, _thread.interrupt_main).start()
        else:
            hook(u)

    sys.unraisablehook = unraisable


def _drop_leftovers_of_interrupted_work() -> None:
    """Ctrl-C can land inside an asynchronous checkpoint save; the half-built event loop and unawaited coroutines
    it leaves would print tracebacks when collected. The run is over and its last finished checkpoint is kept."""
    import warnings

    sys.unraisablehook = lambda unraisable: None
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)


if __name__ == "__main__":  # grain's worker processes are spawned: keep the entry point guarded
    sys.exit(main())
