"""One style for every help text, read from the parsers themselves: a default is said as `(default: X)` at
the end of its line, a metavar names the kind of value in capitals and is never the option's own name."""

from __future__ import annotations

import argparse
import re

import pytest

from wsi_dala.cli.app import build_parser
from wsi_dala.cli.common import Formatter
from wsi_dala.cli.reference import cli_reference_markdown, commands, config_reference_markdown

FLAGS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction)
ENDS_WITH_DEFAULT = re.compile(r"\(default: [^()]*(\([^()]*\)[^()]*)*\)$")
# A kind in capitals (N, X, UM, PX, FILE, DIR, NAME, RATE...), maybe with literal alternatives: imagenet|none|PATH.
KIND = re.compile(r"^([a-z0-9_.:]+\|)*([a-z0-9_]+:)?[A-Z][A-Z0-9_]*([=|][A-Za-z0-9_.:|]+)*(\.txt)?$")
KIND_NAMES = {"N", "SLIDE"}  # an option may be named after its kind: --n N, --slide SLIDE


def _options() -> list[tuple[str, str, str, str]]:
    """(command, option, help as printed on one line, metavar as printed) for every documented option."""
    rows = []
    for command, parser in commands(build_parser()):
        formatter = Formatter(prog=command)
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, FLAGS):
                continue
            text = " ".join(formatter._expand_help(action).split()) if action.help else ""
            metavar = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
            rows.append((command, action.option_strings[-1], text, metavar))
    return rows


OPTIONS = _options()


def test_there_are_options_to_check():
    assert len(OPTIONS) > 150 and {c for c, *_ in OPTIONS} >= {"wsi-dala run", "wsi-dala train", "wsi-dala gan train"}


def test_every_default_is_said_one_way_at_the_end():
    wrong = [
        (c, o, t[-60:])
        for c, o, t, _ in OPTIONS
        if re.search(r"\bdefault\b(?!\.yaml)", t) and not ENDS_WITH_DEFAULT.search(t)
    ]
    assert not wrong, "\n".join(map(str, wrong))


def test_every_metavar_names_a_kind_not_the_option():
    wrong = []
    for command, option, _text, metavar in OPTIONS:
        own = option.lstrip("-").replace("-", "_").upper()
        words = metavar.replace("[=", " ").replace("[:", " ").replace("[", " ").replace("]", " ").replace("...", " ")
        for word in words.split():
            if word.startswith("{"):
                continue  # a list of choices
            if (word == own and own not in KIND_NAMES) or not KIND.match(word):
                wrong.append((command, option, metavar))
    assert not wrong, "\n".join(map(str, wrong))


@pytest.mark.parametrize("option", ["--reader-threads", "--precision", "--backend", "--tile-size"])
def test_an_option_has_one_default_everywhere(option):
    defaults = {t.rsplit("(default: ", 1)[-1] for _c, o, t, _m in OPTIONS if o == option and "(default: " in t}
    assert len(defaults) <= 1, (option, defaults)


def test_the_references_in_the_docs_are_written_from_the_code():
    cli, settings = cli_reference_markdown(), config_reference_markdown()
    assert "## `wsi-dala models`" in cli and "| `--fetch` | `NAME` |" in cli and "## `wsi-dala gan train`" in cli
    assert "| `tiling.qc.max_edge_blur_um` | float (> 0, ≤ 20) | `0.45` | out of focus:" in settings
    rows = [line for line in settings.splitlines() if line.startswith("| `")]
    undocumented = [line for line in rows if line.endswith("|  |")]
    assert len(rows) > 100 and not undocumented, undocumented


# Options whose one name covers a different thing per command, so their defaults differ on purpose.
DEFAULTS_DIFFER_ON_PURPOSE = {
    "--batch-size": "pretrain: tiles per contrastive step (2 views each); gan train: per GAN step",
    "--epochs": "demo: its short training on generated slides",
    "--lr": "pretrain (AdamW, cosine, contrastive loss) and gan train (Adam, two networks) train different things",
    "--mpp": "where the tile µm/px comes from: the model card (run), the data (train...), none (tile: 0.5)",
    "--seed": "demo: the seed of its generated slides",
}


def test_an_option_has_one_default_wherever_it_appears():
    by_option: dict[str, dict[str, str]] = {}
    for command, option, text, _metavar in OPTIONS:
        found = re.search(r"\(default: (.*)\)$", text)
        if found:
            default = found.group(1).split(", or `")[0]  # "none, or `scoring.x` in --config": the config may set it
            by_option.setdefault(option, {})[command] = default
    differing = {o: d for o, d in by_option.items() if len(set(d.values())) > 1 and o not in DEFAULTS_DIFFER_ON_PURPOSE}
    assert not differing, differing
    assert by_option["--min-tissue"]["wsi-dala train"] == by_option["--min-tissue"]["wsi-dala run"] == "0.25"
