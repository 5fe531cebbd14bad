"""`python -m RL.config --print [config=path.yaml] [dotted.key=value ...]`: the resolved reference."""
from typing import Optional

from RL.config.loading import load_config, to_yaml
from RL.config.schema import ConfigError
from common.cli import UsageError, run_cli

USAGE = "usage: python -m RL.config --print [config=path.yaml] [dotted.key=value ...]"


def main(argv: Optional[list[str]] = None) -> None:
    """Print the reference for `argv`; without `argv` (the command line) a mistake is one `error:` line, exit 2."""
    if argv is None:
        run_cli(print_reference, ConfigError)
    print_reference(argv)


def print_reference(argv: list[str]) -> None:
    """The resolved config (secrets redacted); raises ConfigError or UsageError."""
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    if argv[0] != "--print":
        raise UsageError(f"unknown option {argv[0]!r}; {USAGE}")
    print(to_yaml(load_config(argv[1:], require_inputs=False), redact=True), end="")
