"""The CLI and configuration references of the docs, written from the code itself (the argparse parsers and
the settings models, with the comment beside each field), so the docs cannot drift from what runs.
``docs/hooks.py`` puts them into the pages when MkDocs builds; ``tests/test_cli_style.py`` reads the same rows."""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import tokenize
import typing
from collections.abc import Iterator

from pydantic import BaseModel

from wsi_dala.cli.app import build_parser
from wsi_dala.cli.common import Formatter
from wsi_dala.core.config import BatchConfig, GanConfig, PipelineConfig, PretrainConfig, TrainConfig

FLAGS = (argparse._HelpAction, argparse._VersionAction)


def commands(parser: argparse.ArgumentParser, name: str = "wsi-dala") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every (command, parser), subcommands included (``wsi-dala gan train``)."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command, sub in action.choices.items():
                yield from commands(sub, f"{name} {command}")


def option_rows(parser: argparse.ArgumentParser, command: str) -> list[tuple[str, str, str]]:
    """(option names, metavar, help on one line) of a command's documented options, as ``--help`` prints them."""
    formatter = Formatter(prog=command)
    rows = []
    for action in parser._actions:
        if action.help == argparse.SUPPRESS or isinstance(action, FLAGS):
            continue
        text = " ".join(formatter._expand_help(action).split()) if action.help else ""
        if action.option_strings:
            metavar = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
            names = ", ".join(action.option_strings)
        else:
            metavar, names = "", formatter._get_default_metavar_for_positional(action)
        rows.append((names, metavar if action.nargs != 0 else "", text))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def cli_reference_markdown() -> str:
    parts = []
    for command, parser in commands(build_parser()):
        if any(isinstance(a, argparse._SubParsersAction) for a in parser._actions) and command != "wsi-dala":
            parts.append(f"## `{command}`\n\n{parser.description or ''}\n\nSubcommands below.\n")
            continue
        if command == "wsi-dala":
            continue
        usage = " ".join(parser.format_usage().split()).removeprefix("usage: ")
        lines = [f"## `{command}`", "", parser.description or "", "", f"`{_cell(usage)}`", ""]
        lines += ["| option | value | what it does |", "|---|---|---|"]
        lines += [
            f"| `{_cell(n)}` | {f'`{_cell(m)}`' if m else ''} | {_cell(t)} |"
            for n, m, t in option_rows(parser, command)
        ]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment written beside (or inside) each field's line in the class source: the why of the setting."""
    source = inspect.getsource(model)
    tree = ast.parse(source)
    comments: dict[int, str] = {}
    above: dict[int, str] = {}  # a comment on its own line, for the field below it
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            text, line = token.string.lstrip("#").strip(), token.start[0]
            if token.line.strip().startswith("#"):
                above[line + 1] = text
            else:
                comments.setdefault(line, text)
    found = {}
    for node in tree.body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = range(node.lineno, (node.end_lineno or node.lineno) + 1)
            text = next((comments[n] for n in lines if n in comments), "") or above.get(node.lineno, "")
            found[node.target.id] = text
    return found


def _type_text(annotation: object) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    return _cell(text.replace("typing.", "").replace("NoneType", "None"))


def _bounds(metadata: list[object]) -> str:
    words = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "at least", "pattern": "matches"}
    found = []
    for item in metadata:
        for key, sign in words.items():
            value = getattr(item, key, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def _help_by_option(command: str) -> dict[str, str]:
    """A command's option help by its dest, for settings whose source line has no comment (the same setting)."""
    parser = dict(commands(build_parser()))[command]
    formatter = Formatter(prog=command)
    return {a.dest: " ".join(formatter._expand_help(a).split()) for a in parser._actions if a.help and a.option_strings}


def settings_rows(
    model: type[BaseModel], prefix: str = "", helps: dict[str, str] | None = None
) -> list[tuple[str, str, str, str]]:
    """(key, type and bounds, default, why) for every setting, nested sections flattened as ``tiling.qc.mode``;
    where the source has no comment, the help of the command-line option of the same name."""
    comments = field_comments(model)
    helps = helps or {}
    rows = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += settings_rows(annotation, f"{prefix}{name}.", helps)
            continue
        kind = _type_text(annotation)
        bounds = _bounds(list(info.metadata))
        if info.is_required():
            default = "required"
        else:
            value = info.get_default(call_default_factory=True)
            default = f"`{value if value is not None else 'none'}`"
        why = comments[name] or helps.get(name, "")
        rows.append((f"{prefix}{name}", f"{kind} ({bounds})" if bounds else kind, default, why))
    return rows


def config_reference_markdown() -> str:
    sections: list[tuple[str, type[BaseModel], str]] = [
        ("Pipeline (`run`, `batch`, `tile`: `--config FILE`)", PipelineConfig, "wsi-dala run"),
        ("Archive runs (`batch`)", BatchConfig, "wsi-dala batch"),
        ("Training (`train --config FILE`)", TrainConfig, "wsi-dala train"),
        ("Pre-training (`pretrain`)", PretrainConfig, "wsi-dala pretrain"),
        ("GAN (`gan train`)", GanConfig, "wsi-dala gan train"),
    ]
    parts = []
    for title, model, command in sections:
        lines = [f"## {title}", "", (model.__doc__ or "").strip(), ""]
        lines += ["| key | type | default | what it is |", "|---|---|---|---|"]
        rows = settings_rows(model, helps=_help_by_option(command))
        lines += [f"| `{k}` | {t} | {_cell(d)} | {_cell(w)} |" for k, t, d, w in rows]
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def foundation_presets_markdown() -> str:
    """The foundation-model presets as a table (docs/models.md), from ``wsi_dala.model.foundation_presets``."""
    from wsi_dala.model.foundation_presets import PRESETS

    rows = [
        "| `--arch` | network | tokens | embedding | input, µm/px | mean / std | parameters (stated) | weights "
        "| licence |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in PRESETS.values():
        registers = f", {p.register_tokens} registers" if p.register_tokens else ""
        network = f"{p.library} `{p.constructor}`: depth {p.depth}, {p.heads} heads, {p.patch_px} px patches"
        network += f"{registers}, {p.mlp}"
        norm = "ImageNet" if p.mean == (0.485, 0.456, 0.406) else f"{p.mean} / {p.std}"
        gated = ", gated" if p.gated else ""
        rows.append(
            f"| `{p.name}` | {network} | {p.embed_dim} | {p.embedding} ({p.embedding_dim}) | {p.input_px} px "
            f"(resize {p.resize_px}), {p.mpp} | {norm} | {p.parameters:,} ({p.stated}) | "
            f"[{p.hf_repo}](https://huggingface.co/{p.hf_repo}) `{p.weights_file}`{gated} | {p.licence} |"
        )
    return "\n".join(rows)
