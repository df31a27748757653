"""The viewer's web app (Flask): read-only, every route a GET, every file one a finished run lists.

Safe by default: the CLI binds 127.0.0.1; on any other address it requires a token (printed at start), taken
from ``?token=`` once and kept in a cookie. Requests name runs by id and tiles by numbers; nothing they send
becomes a path. A slide is served only while it is the file the run read, and only its pyramid (never its
label or macro image).

Flask, because it is the smallest well-kept framework that does this (routing, templates with escaping,
static files), and its threaded server answers the tiles of one viewer in parallel.
"""

from __future__ import annotations

import hmac
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, make_response, redirect, render_template, request, url_for

from wsi_dala.core.errors import WsiDalaError
from wsi_dala.outputs.slide_answer import lowest_threshold_regions
from wsi_dala.tiling.store import TileStore
from wsi_dala.viewer.catalogue import RunEntry, find_runs
from wsi_dala.viewer.deepzoom import DeepZoomSlide
from wsi_dala.viewer.layers import STYLES, colour_stops, heatmap_layers, render_layer, tile_at

TOKEN_COOKIE = "wsi_dala_token"
REGION_LIMIT = 2000  # polygons sent to the page (the lowest threshold's; a slide rarely has more than tens)


def create_app(root: str | Path, token: str | None = None) -> Flask:
    """The app over the finished runs of ``root`` (a run folder or a batch output)."""
    runs = find_runs(root)
    app = Flask(__name__)
    app.config["JSON_SORT_KEYS"] = False

    @lru_cache(maxsize=32)
    def slide_of(run_id: str) -> DeepZoomSlide:
        entry = _entry(run_id)
        problem = entry.slide_problem()
        if problem is not None:
            abort(404, problem)
        reader = TileStore(entry.tiles_store).info.tiling.reader
        return DeepZoomSlide(entry.slide_path, reader)

    @lru_cache(maxsize=16)
    def layer_png(run_id: str, name: str) -> tuple[bytes, float]:
        heatmap = _entry(run_id).output("heatmap")
        if heatmap is None or name not in heatmap_layers(heatmap)[0]:
            abort(404, f"run {run_id} has no {name} layer")
        image = render_layer(heatmap, name)
        return image.png, image.top

    def _entry(run_id: str) -> RunEntry:
        entry = runs.get(run_id)
        if entry is None:
            abort(404, f"no run {run_id!r} here")
        return entry

    @app.before_request
    def _check_token() -> Any:
        if token is None:
            return None
        given = request.args.get("token") or request.cookies.get(TOKEN_COOKIE) or ""
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, "this viewer needs the token it printed when it started: open the address it printed")
        if request.args.get("token"):  # once: from then on the cookie carries it
            response = redirect(request.path)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
            return response
        return None

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'"
        )
        return response

    @app.errorhandler(WsiDalaError)
    def _input_error(exc: WsiDalaError) -> tuple[str, int]:
        return str(exc), 404

    @app.get("/")
    def index() -> Any:
        if len(runs) == 1:
            return redirect(url_for("viewer", run_id=next(iter(runs))))
        listed = [
            (run_id, entry.record.get("slide_stem", run_id), entry.record.get("slide_answer", {}))
            for run_id, entry in runs.items()
        ]
        return render_template("index.html", runs=listed, root=str(Path(root).resolve()))

    @app.get("/run/<run_id>/")
    def viewer(run_id: str) -> Any:
        entry = _entry(run_id)
        return render_template("viewer.html", run_id=run_id, stem=entry.record.get("slide_stem", run_id))

    @app.get("/run/<run_id>/info.json")
    def info(run_id: str) -> Any:
        entry = _entry(run_id)
        record = entry.record
        heatmap = entry.output("heatmap")
        names, cell_l0 = heatmap_layers(heatmap) if heatmap is not None else ([], 1.0)
        store = TileStore(entry.tiles_store).info.tiling
        layers = []
        for name in names:
            style = STYLES[name]
            top = style.top if style.top is not None else layer_png(run_id, name)[1]
            layers.append({"name": name, "label": style.label, "top": top, "stops": colour_stops(style.colour_map)})
        return jsonify(
            {
                "run_id": run_id,
                "slide": entry.record.get("slide_stem", run_id),
                "width_l0": store.slide.width,
                "height_l0": store.slide.height,
                "mpp": record.get("resolution", {}).get("slide_mpp"),
                "cell_l0": cell_l0,
                "layers": layers,
                "regions": _regions(entry),
                "slide_answer": record.get("slide_answer", {}),
                "slide_problem": entry.slide_problem(),
            }
        )

    @app.get("/run/<run_id>/slide.dzi")
    def dzi(run_id: str) -> Response:
        return Response(slide_of(run_id).dzi, mimetype="application/xml")

    @app.get("/run/<run_id>/slide_files/<int:level>/<int:column>_<int:row>.jpeg")
    def tile(run_id: str, level: int, column: int, row: int) -> Response:
        jpeg = slide_of(run_id).tile_jpeg(level, column, row)
        if jpeg is None:
            abort(404, "no such tile")
        response = Response(jpeg, mimetype="image/jpeg")
        response.headers["Cache-Control"] = "private, max-age=3600"
        return response

    @app.get("/run/<run_id>/layers/<name>.png")
    def layer(run_id: str, name: str) -> Response:
        if name not in STYLES:
            abort(404, f"no layer {name!r}")
        png, _ = layer_png(run_id, name)
        return Response(png, mimetype="image/png")

    @app.get("/run/<run_id>/tile.json")
    def tile_info(run_id: str) -> Any:
        entry = _entry(run_id)
        try:
            x, y = float(request.args.get("x", "nan")), float(request.args.get("y", "nan"))
        except ValueError:
            abort(400, "x and y: level-0 pixel coordinates")
        if not (math.isfinite(x) and math.isfinite(y)):
            abort(400, "x and y: level-0 pixel coordinates")
        found = tile_at(entry.tiles_store, x, y)
        return make_response(jsonify(found or {}), 200 if found else 404)

    return app


def _regions(entry: RunEntry) -> list[list[list[list[float]]]]:
    """The tumour regions at the lowest threshold: per polygon, its rings (outline, then holes) of [x, y]."""
    path = entry.output("tumour_geojson")
    if path is None:
        return []
    polygons = []
    for feature in lowest_threshold_regions(path):
        geometry = feature.get("geometry", {})
        parts = [geometry.get("coordinates")] if geometry.get("type") == "Polygon" else geometry.get("coordinates", [])
        polygons += [part for part in parts if isinstance(part, list)]
    return polygons[:REGION_LIMIT]
