"""--server and --token-file: commands that run the network on a ``ctsam3d serve`` server instead of here."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..cli import CommandError


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", help="run the network on this ctsam3d serve server (e.g. "
                        "http://gpu-host:8000) instead of here; the weights, device and precision are then the "
                        "server's")
    parser.add_argument("--token-file", type=Path, metavar="FILE", help="file whose first token is the server's "
                        "bearer token (with --server)")


def check_server_arguments(args: argparse.Namespace, local_only: Sequence[str] = ()) -> Optional[str]:
    """The bearer token for --server (None without one). Refuses --weights, --device and --precision with
    --server (the server chose them), and ``local_only``: further options (attribute names, unset when None)
    that a server cannot honour."""
    if args.server is None:
        if args.token_file is not None:
            raise CommandError("--token-file is for --server")
        return None
    if args.weights is not None:
        raise CommandError("--weights and --server exclude each other: the server runs its own weights")
    for name, default in (("device", "auto"), ("precision", "auto"), *((name, None) for name in local_only)):
        if getattr(args, name, default) != default:
            raise CommandError(f"--{name.replace('_', '-')} cannot be used with --server")
    if args.token_file is None:
        return None
    from ..protocol import read_tokens

    return read_tokens(args.token_file)[0]


@contextlib.contextmanager
def server_errors() -> Iterator[None]:
    """A server that cannot be reached, refuses the token or fails, as one line without a traceback."""
    from ..remote import ServerError

    try:
        yield
    except (ConnectionError, PermissionError, ServerError) as error:
        raise CommandError(str(error)) from error
