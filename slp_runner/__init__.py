"""slp-runner: move, version and benchmark the artifacts around LLM inference."""

__version__ = "0.1.0"
