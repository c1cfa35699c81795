"""``python -m slp_runner.examples gemma-path|prompts-path``: print an example's local path."""

import sys

from . import gemma_path, prompts_path

COMMANDS = {"gemma-path": gemma_path, "prompts-path": prompts_path}

if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in COMMANDS:
        raise SystemExit(f"usage: python -m slp_runner.examples {'|'.join(COMMANDS)}")
    print(COMMANDS[sys.argv[1]]())
