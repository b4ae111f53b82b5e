"""`offsite client run ...`: take part in a job from a data owner's workstation."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("offsite.client")


def _device(choice: str) -> str:
    if choice == "auto":
        import torch
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _failed(error: Exception) -> int:
    """The error's message on stderr and its documented exit code; an unexpected one is re-raised (exit 1,
    with its traceback)."""
    from offsite.client.run import exit_code_for

    code = exit_code_for(error)
    if code == 1:
        raise error
    detail = error.details() if hasattr(error, "details") else str(error)
    print(f"offsite client: error: {detail}", file=sys.stderr)
    return code


def cmd_run(args) -> int:
    from offsite.client.run import ClientConfig, run  # torch and peft: only when running

    try:
        cfg = ClientConfig(server=args.server, ca_file=Path(args.ca), workdir=Path(args.workdir), data=Path(args.data),
                           heldout=Path(args.heldout) if args.heldout else None,
                           token_file=Path(args.token_file) if args.token_file else None, threads=args.threads,
                           show_progress=not args.no_progress, enroll_server=args.enroll_server,
                           retry_s=args.retry_s, text_column=args.text_column, checkpoint_every=args.checkpoint_every,
                           checkpoint_every_s=args.checkpoint_every_s,
                           device=_device(args.device), job=args.job)
        summary = run(cfg)
    except KeyboardInterrupt:
        print("offsite client: stopped (Ctrl-C). Run the same command to go on: the enrollment, the downloaded bundle, "
              "training checkpoints and any sealed update waiting in the outbox are kept.", file=sys.stderr)
        return 130
    except Exception as e:  # every failure leaves with a message and a distinct exit code
        return _failed(e)
    log.info("%s", summary)
    return 0


def cmd_check(args) -> int:
    """The client's data through the job's tokenizer, offline: what `client run` does once the bundle has
    arrived and before it trains, without a coordinator."""
    from offsite.client.run import EXIT_CONFIG
    from offsite.client.train import encode_checked
    from offsite.errors import IntegrityError
    from offsite.emulator.bundle import describe_bundle
    from offsite.textdata import read_examples

    try:
        tokenizer, _, _ = describe_bundle(args.bundle)
        examples = read_examples(args.data, args.text_column)
        _, report = encode_checked(tokenizer, examples, args.max_length)
    except (IntegrityError, OSError) as e:  # not a bundle, or one that does not verify
        print(f"offsite client: error: {args.bundle}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        return _failed(e)
    print(f"{args.data}: {report}")
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="enroll (first time), then train and upload each round it is selected for, until "
                                   "its jobs are done",
                       description="Exit codes: 0 done, 2 bad data file (or data the job's tokenizer cannot render), "
                                   "3 authentication failed, 4 coordinator unreachable, 5 bad configuration, 130 stopped by Ctrl-C "
                                   "(the same command resumes). A failure "
                                   "after enrollment is reported to the coordinator (a short reason) before the exit.")
    p.add_argument("--server", required=True, help="coordinator host:port (mutual TLS)")
    p.add_argument("--enroll-server", help="coordinator enrollment host:port (default: --server port + 1)")
    p.add_argument("--ca", required=True, help="the coordinator's CA certificate (PEM)")
    p.add_argument("--workdir", required=True, help="this client's folder: identity, bundle cache, adapters")
    p.add_argument("--data", required=True,
                   help="training data, never leaves this machine: JSONL with 'text', 'prompt'+'completion' or chat "
                        "'messages'; CSV; or .txt (one example per paragraph)")
    p.add_argument("--text-column", default="text", help="the text column of a CSV file")
    p.add_argument("--device", default="auto", help="auto (a GPU if torch sees one), cpu, cuda or cuda:N")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="save training state every N steps or --checkpoint-every-s seconds, whichever comes first; the "
                        "same command resumes after a crash")
    p.add_argument("--checkpoint-every-s", type=float, default=60.0, help="seconds between training checkpoints")
    p.add_argument("--heldout", help="held-out examples (any --data format): their loss before and after each round "
                                     "is logged, and sent to the coordinator for jobs that ask (report_heldout)")
    p.add_argument("--job", help="take part in this job only (default: every job whose roster names this client, "
                                 "oldest first, until all are over)")
    p.add_argument("--token-file", help="single-use enrollment token (needed the first time)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--retry-s", type=float, default=600.0,
                   help="keep retrying this long while the coordinator is unreachable (restarts, network blips)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("check", help="render a data file with a job's tokenizer, offline: counts, lengths, the share "
                                     "cut at max_length, or the first example it cannot render",
                       description="Exit codes: 0 fine, 2 bad data file or an example the tokenizer cannot render, "
                                   "5 bad configuration (a bundle that does not verify).")
    p.add_argument("--data", required=True, help="the file `client run --data` would read")
    p.add_argument("--bundle", required=True, help="the job's emulator bundle folder (WORKDIR/jobs/JOB/bundle once `client run` has fetched it)")
    p.add_argument("--max-length", type=int, default=256, help="the job's [training] max_length")
    p.add_argument("--text-column", default="text", help="the text column of a CSV file")
    p.set_defaults(func=cmd_check)
