"""`offsite`: one command line with `cloud`, `client` and `emulator` groups."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from offsite.errors import OffsiteError
from offsite.logs import log_handler, quiet_third_parties


def parser() -> argparse.ArgumentParser:
    """Every command and flag (what `offsite --help` shows; tests parse the README's commands with it)."""
    from offsite.client import cli as client_cli
    from offsite.cloud import cli as cloud_cli
    from offsite.emulator import cli as emulator_cli

    top = argparse.ArgumentParser(prog="offsite", description="Federated Offsite-Tuning of causal language models.")
    top.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    top.add_argument("--log-format", choices=("text", "json"), default="text",
                     help="json: one object per line {ts, level, logger, msg[, exc]}, for log collectors")
    groups = top.add_subparsers(dest="group", required=True)
    cloud_cli.register(groups.add_parser("cloud", help="the model owner's coordinator"))
    client_cli.register(groups.add_parser("client", help="the data owner's client"))
    emulator_cli.register(groups.add_parser("emulator", help="build and inspect emulators"))
    return top


def main(argv: list[str] | None = None) -> int:
    # per-file load/save bars drown the useful output; set before transformers is imported, which reads it
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # gRPC's C core logs each failed TLS handshake at INFO on stderr, beside the error offsite explains (a wrong
    # --ca, say); its errors still show. Read once, when grpc is first imported
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    quiet_third_parties()  # before anything imports them
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, handlers=[log_handler(args.log_format)])
    try:
        return int(args.func(args) or 0)
    except OffsiteError as e:
        print(f"offsite: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
