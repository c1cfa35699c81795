"""The Hydra application behind ``slp -m`` (a sweep) and Hydra's own flags
(``--cfg``, ``--info``, ``hydra.*`` overrides). A single run does without it: it is
composed once by :mod:`.compose`, and ``--version``, ``--help`` and ``--completion``
answer without Hydra at all. Importing it registers the config resolvers and the
schema; :func:`hydra_main` runs each job's task and turns its errors into one line.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from . import cli
from .examples import register_resolvers
from .schema import register as register_schema

register_resolvers()
register_schema()

CONF_DIR = cli.CONF_DIR


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    cli.run_reporting_errors(cfg)
