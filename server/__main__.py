"""`python -m server [--config FILE] [--model DIR] [--port N] ...`: flags for every ServerSettings field."""

from __future__ import annotations

import argparse
import sys

from server.main import serve
from server.settings import ServerSettings, load_settings


def parse_args(argv: list[str] | None = None) -> tuple[str | None, dict[str, object]]:
    parser = argparse.ArgumentParser(prog="python -m server", description=__doc__)
    parser.add_argument("--config", default=None, help="YAML config file (default: configs/server.yaml)")
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=field.description)
        elif name == "cors_origins":
            parser.add_argument(flag, dest=name, default=None, help="comma-separated origins")
        else:
            parser.add_argument(flag, dest=name, default=None, help=field.description)
    args = vars(parser.parse_args(argv))
    return args.pop("config"), args


def main(argv: list[str] | None = None) -> int:
    config_file, overrides = parse_args(argv)
    return serve(load_settings(config_file, **overrides))


if __name__ == "__main__":
    sys.exit(main())
