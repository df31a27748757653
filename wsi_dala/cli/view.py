"""CLI verb ``view``: a read-only local web viewer over a run folder or a batch output."""

from __future__ import annotations

import argparse
import ipaddress
import secrets

from wsi_dala.cli.common import Verb, number_in
from wsi_dala.core.errors import ConfigError

DEFAULT_PORT = 8765  # batch's report.html links to the viewer here


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="RUN_DIR|BATCH_OUT", help="a run folder, or a batch output (every slide)")
    parser.add_argument(
        "--port", type=number_in(0, 65535, integer=True), default=DEFAULT_PORT, help="port to listen on (0: any free)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; anything but this machine's loopback requires the token printed at start",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _view(args: argparse.Namespace) -> int:
    from wsi_dala.core.extras import require

    require("flask", "wsi-dala view")
    from werkzeug.serving import make_server

    from wsi_dala.viewer.app import create_app

    token = None if _is_loopback(args.host) else secrets.token_urlsafe(24)
    app = create_app(args.folder, token)  # a folder with no finished run is refused here, in one line
    try:
        server = make_server(args.host, int(args.port), app, threaded=True)
    except OSError as exc:
        raise ConfigError(f"{args.host}:{args.port}: cannot listen there ({exc.strerror or exc})") from exc
    address = f"http://{args.host}:{server.server_port}/"
    print(f"viewer: {address}{f'?token={token}' if token else ''}  (read-only; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


VERBS = (
    Verb(
        "view",
        "a local, read-only web viewer of a run or a batch: zoomable slide, heatmap layers, regions",
        _configure,
        _view,
    ),
)
