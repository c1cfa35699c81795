"""The Hydra application behind ``slp``, imported only for a command that needs it
(``slp --version``, ``--help`` and ``--completion`` answer without importing Hydra).
Importing it registers the config resolvers and the schema; :func:`hydra_main` runs
the task a composed config names and turns its errors into one line.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from . import cli
from .examples import register_resolvers
from .schema import register as register_schema
from .tasks import multirun_job_dir, run_task

register_resolvers()
register_schema()

CONF_DIR = cli.CONF_DIR


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from .pipeline import from_config

    try:
        run_task(cfg)
    except Exception as exc:
        if cli._TRACE:  # a developer's view: the whole traceback
            raise
        message = from_config.redactor(cfg).text(cli.user_error_line(exc))
        print(f"slp: error: {message}", file=sys.stderr)
        job_dir = multirun_job_dir()
        if job_dir:  # one failed job of a sweep: record it, let the others run
            from .bench import sweep
            from .tasks import job_overrides

            sweep.write_job_result(job_dir, {"status": "failed", "error": message, "overrides": job_overrides()},
                                   from_config.redactor(cfg))
            return
        raise SystemExit(1) from None
    except KeyboardInterrupt as exc:
        cli._exit_interrupted(exc)
