"""``ctsam3d serve``: the network on this machine for clients elsewhere (``RemoteSession``, ``--server``)."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import socket
import stat
import threading
import time
import warnings
import webbrowser
from pathlib import Path

from ..cli import CommandError, HelpFormatter
from ..inference import PRECISIONS
from ..server.bounds import DEFAULT_MAX_PATCHES, ConnectionLimits

LOOPBACK_NAMES = ("localhost",)

MIN_TOKEN_CHARACTERS = 22
"""Shortest token for a server beyond loopback: 128 bits as URL-safe base64 (secrets.token_urlsafe(16))."""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the network over HTTP to clients without a GPU",
        description="Load the network once and serve interactive sessions over HTTP: 3D Slicer, 'ctsam3d\n"
        "segment --server' and 'ctsam3d evaluate --server' then click here, on this machine's GPU.\n"
        "Every request but /health needs a bearer token from --token-file; without one the server\n"
        "listens on loopback only. /metrics gives Prometheus metrics. Needs the server extra:\n"
        '  pip install "ctsam3d[server]"',
        epilog="example (a department GPU server; clients give --server http://gpu-host:8000, browsers open\n"
        "http://gpu-host:8000/):\n"
        "  ctsam3d serve --weights params.pth --host 0.0.0.0 --port 8000 --token-file tokens.txt",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--weights", required=True, type=Path, help="checkpoint (.pth)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; "
                        "anything but loopback needs --token-file)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto", help="how the network runs (see "
                        "'ctsam3d segment --help')")
    parser.add_argument("--token-file", type=Path, metavar="FILE",
                        help="bearer tokens clients must present, one per line (# starts a comment)")
    parser.add_argument("--max-sessions", type=int, default=32, help="most sessions open at once")
    parser.add_argument("--max-image-mb", type=float, default=1024.0, help="largest image a client may upload "
                        "(MiB, uncompressed)")
    parser.add_argument("--image-cache-mb", type=float, default=2048.0,
                        help="uploaded images kept for later sessions (MiB)")
    parser.add_argument("--idle-timeout", type=float, default=1800.0, metavar="SECONDS",
                        help="close a session after this long without a successful request")
    parser.add_argument("--max-memory-mb", type=float, help="memory that uploads, cached images, sessions and "
                        "the running job may hold together (MiB; default: half of this machine's memory); "
                        "beyond it requests are refused with 503 and Retry-After")
    parser.add_argument("--max-patches", type=int, default=DEFAULT_MAX_PATCHES,
                        help="most patches a client may let one click open (its max_patches option)")
    parser.add_argument("--max-sessions-per-token", type=int, help="most sessions one token may hold (default: "
                        "a quarter of --max-sessions when the token file has several tokens)")
    parser.add_argument("--max-connections", type=int, default=ConnectionLimits.max_connections,
                        help="most open connections; a request's headers must arrive within "
                        f"{ConnectionLimits.header_timeout_s:g} s and its body within "
                        f"{ConnectionLimits.body_timeout_s:g} s")
    parser.add_argument("--shutdown-timeout", type=float, default=ConnectionLimits.shutdown_timeout_s,
                        metavar="SECONDS", help="on SIGTERM or Ctrl-C, how long requests in flight may finish")
    parser.add_argument("--open", action="store_true", help="open the web client in this machine's browser once the "
                        "server listens (its address is printed either way)")
    parser.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` is reachable from this machine only. A name other than localhost is
    not trusted to resolve to loopback."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def page_address(host: str, port: int) -> str:
    """The web client's address: on a server listening on every interface, by this machine's name (what other
    machines would type)."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}/"


def open_when_listening(host: str, port: int, page: str, timeout_s: float = 120.0) -> None:
    """Opens ``page`` in this machine's browser once ``host:port`` takes connections; says so when there is no
    browser to open (a server without a screen)."""
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host.strip("[]")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((probe_host, port), timeout=1.0):
                break
        except OSError:
            time.sleep(0.2)
    else:
        return
    if not webbrowser.open(page):
        print(f"no web browser found on this machine: open {page} in a browser", flush=True)


def check_server_extra() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise CommandError(f"ctsam3d serve needs FastAPI and uvicorn, and {error.name or error} cannot be imported: "
                           'pip install "ctsam3d[server]"') from error


def run(args: argparse.Namespace) -> int:
    # Everything the user can get wrong is checked before the ~300 MB of weights load.
    check_server_extra()
    for name in ("max_sessions", "max_image_mb", "image_cache_mb", "idle_timeout", "max_memory_mb", "max_patches",
                 "max_sessions_per_token", "max_connections", "shutdown_timeout"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise CommandError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be 0 to 65535, got {args.port}")
    tokens = None
    if args.token_file is not None:
        from ..protocol import read_tokens

        tokens = read_tokens(args.token_file)
        short = [token for token in tokens if len(token) < MIN_TOKEN_CHARACTERS]
        if short and not is_loopback(args.host):
            raise CommandError(f"{args.token_file} holds {len(short)} token(s) shorter than {MIN_TOKEN_CHARACTERS} "
                               "characters (128 bits), too easy to guess for a server other machines reach: make "
                               "them with python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
        if os.name == "posix" and args.token_file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            warnings.warn(f"{args.token_file} is readable by other users of this machine: chmod 600 it", stacklevel=1)
    elif not is_loopback(args.host):
        raise CommandError(f"--host {args.host} lets other machines in: give --token-file FILE (one token per line) "
                           "so that only your users can, or listen on 127.0.0.1")
    if not args.weights.is_file():
        raise FileNotFoundError(f"weights not found: {args.weights}")

    import uvicorn

    from .. import load_checkpoint
    from ..files import sha256_of
    from ..server.app import create_app
    from ..server.connections import uvicorn_config
    from ..server.logs import RateLimit, limit_log_rate
    from ..server.web import BUILD_COMMAND, client_built

    started = time.perf_counter()
    network = load_checkpoint(args.weights, device=args.device)
    model_info = {"weights": args.weights.name, "sha256": sha256_of(args.weights)}
    print(f"loaded {args.weights} in {time.perf_counter() - started:.2f} s")
    app = create_app(network, device=args.device, precision=args.precision, tokens=tokens,
                     max_sessions=args.max_sessions, max_sessions_per_token=args.max_sessions_per_token,
                     max_image_bytes=int(args.max_image_mb * 2**20), image_cache_bytes=int(args.image_cache_mb * 2**20),
                     idle_timeout_s=args.idle_timeout, max_patches=args.max_patches,
                     max_memory_bytes=None if args.max_memory_mb is None else int(args.max_memory_mb * 2**20),
                     model_info=model_info)
    server = app.state.server
    access = "bearer token required" if tokens is not None else "no token (loopback only)"
    print(f"memory budget: {server.budget.limit_bytes / 2**20:.0f} MiB (--max-memory-mb); at most "
          f"{server.registry.max_sessions} sessions, {server.registry.max_sessions_per_owner} per token; "
          f"max_patches at most {server.max_patches}")
    print(f"serving on http://{args.host}:{args.port} (device: {server.device}, precision: {server.precision}; "
          f"{access}); Ctrl-C stops", flush=True)
    page = page_address(args.host, args.port)
    if client_built():
        print(f"web client: open {page} in a browser", flush=True)
    else:
        print(f"web client not built (its page says so): from the repository run {BUILD_COMMAND}", flush=True)
    if args.open:
        threading.Thread(target=open_when_listening, args=(args.host, args.port, page), name="ctsam3d-open-page",
                         daemon=True).start()
    limits = ConnectionLimits(max_connections=args.max_connections, shutdown_timeout_s=args.shutdown_timeout)
    config = uvicorn_config(app, args.host, args.port, limits, log_level="info")
    limit_log_rate(RateLimit())  # after uvicorn's Config, which sets up its loggers
    # uvicorn shuts down gracefully on Ctrl-C, then raises it again for whoever else listens: nobody here.
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
    print("stopped")
    return 0
