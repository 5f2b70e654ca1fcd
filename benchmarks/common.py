"""What every benchmark script starts with: its command line (the docstring as help, `--threads`) and the
process settings (torch threads, transformers' logging at errors only)."""

from __future__ import annotations

import argparse

import torch
from transformers.utils import logging as hf_logging


def benchmark_parser(doc: str | None, threads: int | None = 1) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring; `--threads` (torch threads) unless `threads` is None."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=f"torch threads (default {threads})")
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Parse the command line, set torch's threads from `--threads` and quiet transformers' logging."""
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    return args
