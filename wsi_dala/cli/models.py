"""CLI verb ``models``: the models ``run --model`` takes by name, and which of them work offline here."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from wsi_dala.cli.common import Verb
from wsi_dala.core.errors import ConfigError
from wsi_dala.core.layout import DEFAULT_DEMO_DIR


def _configure_models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--fetch",
        action="append",
        default=[],
        metavar="NAME",
        help="download this model (a WSInfer-zoo name or hf:ORG/REPO[@REVISION]) into the Hugging Face cache "
        "first, e.g. to copy the cache to an offline machine; repeat for more",
    )
    parser.add_argument("--json", action="store_true", help="print the list as JSON instead of a table")
    parser.add_argument(
        "--demo-dir", default=DEFAULT_DEMO_DIR, metavar="DIR", help="where `wsi-dala demo` wrote its model"
    )


def _models(args: argparse.Namespace) -> int:
    from wsi_dala.interop.model_catalogue import catalogue
    from wsi_dala.interop.model_hub import fetch, hub_cache_root, named_model

    for name in args.fetch:
        model = named_model(name)
        if model is None:
            raise ConfigError(f"--fetch {name}: a local path, not a model name (give a zoo name or hf:ORG/REPO)")
        fetched = fetch(model)
        print(
            f"fetched {model.label}: {fetched.origin['hf_repo_id']}@{fetched.origin['hf_revision']} in {fetched.folder}"
        )
    listed = catalogue(Path(args.demo_dir))
    if args.json:
        print(json.dumps({"models": [e.to_json() for e in listed.entries], "problems": listed.problems}, indent=2))
        return 0
    for problem in listed.problems:
        print(f"warning: {problem}")
    groups = dict.fromkeys(entry.group for entry in listed.entries)
    for group in groups:
        rows = [e for e in listed.entries if e.group == group]
        print(f"\n{group} ({len(rows)}; * = usable offline)")
        width = max(len(e.name) for e in rows)
        print(f"    {'NAME':<{width}}  {'TISSUE':<12} {'UM/PX':>6}  {'LICENCE':<14} INTENDED USE")
        for e in rows:
            mpp = f"{e.mpp:.3g}" if e.mpp else "?"
            mark = "*" if e.cached else " "
            print(f"  {mark} {e.name:<{width}}  {e.tissue:<12} {mpp:>6}  {e.licence:<14} {e.intended_use}")
    if not listed.entries:
        print("no models listed")
    print(f"\nHugging Face cache: {hub_cache_root()} (set HF_HOME or HF_HUB_CACHE to move it)")
    print("use one: wsi-dala run SLIDE --model NAME   (UM/PX ? : not fetched yet; `--fetch NAME` fetches it)")
    return 0


VERBS = (
    Verb(
        "models",
        "list the models --model takes by name (WSInfer zoo, Hugging Face cache, this project's) and fetch them",
        _configure_models,
        _models,
    ),
)
