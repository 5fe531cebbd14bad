"""`python -m RL.config --print [config=path.yaml] [dotted.key=value ...]`: the resolved reference."""
import sys
from typing import Optional

from RL.config.loading import load_config, to_yaml
from RL.config.schema import ConfigError


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] != "--print":
        print("usage: python -m RL.config --print [config=path.yaml] [dotted.key=value ...]")
        return
    try:
        cfg = load_config(argv[1:], require_inputs=False)
    except ConfigError as error:
        sys.exit(f"error: {error}")
    print(to_yaml(cfg, redact=True), end="")
