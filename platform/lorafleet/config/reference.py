"""The configuration reference (docs/configuration.md), generated from the pydantic models.

Every key of every user-facing config, with its type, default and description, is read from
the models themselves, so the reference cannot drift from the code: a test compares the
committed file with :func:`render_reference`, and ``make docs`` rewrites it.

Example::

    python -m lorafleet.config.reference > docs/configuration.md
"""

from __future__ import annotations

import json
import sys
import types
import typing
from typing import Any, Iterator, Union

from pydantic import BaseModel, SecretStr
from pydantic_core import PydanticUndefined

HEADER = """# Configuration reference

Generated from the pydantic models by `make docs` (`python -m lorafleet.config.reference`);
do not edit by hand. Unknown keys are errors; every YAML key can be overridden on the
command line with `--set key.path=value`. Lists of objects (`adapters`) are documented by
their item's keys as `adapters[].key`.
"""


def _documents() -> list[tuple[str, str, type[BaseModel]]]:
    from lorafleet.base.build import BaseBuildConfig
    from lorafleet.config.sweep import SweepConfig
    from lorafleet.config.train import FinetuneConfig
    from lorafleet.serve.config import ServeConfig

    return [
        ("Fine-tuning: `jobs/finetune.py --config`", "The YAML files in `jobs/configs/` (one per task).", FinetuneConfig),
        ("Sweeps: `jobs/sweep.py --config`", "`jobs/configs/banking77-sweep.yaml`: a fine-tuning config plus a `sweep` section.", SweepConfig),
        ("Serving: `lorafleet serve --config`, `serve run`", "The `args` of the lorafleet application in `serve/*.yaml` (or a bare file of these keys).", ServeConfig),
        ("Tiny base: `lorafleet base build --config`", "Optional; the defaults build the demo's base.", BaseBuildConfig),
    ]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Config models inside a field's type (``X``, ``Optional[X]``, ``list[X]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in typing.get_args(annotation))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner = " \\| ".join(_type_name(a) for a in args)
        return f"{inner} (optional)" if len(args) < len(typing.get_args(annotation)) else inner
    if origin in (list, tuple, set):
        args = typing.get_args(annotation)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        key, value = typing.get_args(annotation) or (str, Any)
        return f"map {_type_name(key)} → {_type_name(value)}"
    if annotation is SecretStr:
        return "secret string"
    if isinstance(annotation, type):
        return {"str": "string", "int": "integer", "float": "number", "bool": "boolean"}.get(annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return "**required**"
    if isinstance(field.default, SecretStr):
        return "`null`"
    try:
        return f"`{json.dumps(field.default)}`"
    except TypeError:
        return f"`{field.default}`"


def _rows(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(field.annotation)
        is_list = typing.get_origin(field.annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(field.annotation))
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        if nested and not description:  # a section without its own description: its model's docstring
            doc = (nested[0].__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").replace("|", "\\|")
            description = doc or f"The `{path}.*` keys below (`{nested[0].__name__}`)."
        if nested and not is_list:
            yield path, "section", _default(field), description
            yield from _rows(nested[0], f"{path}.")
        elif nested:
            yield path, "list", _default(field), description
            yield from _rows(nested[0], f"{path}[].")
        else:
            yield path, _type_name(field.annotation), _default(field), description


def render_reference() -> str:
    """The whole reference as Markdown."""
    parts = [HEADER]
    for title, where, model in _documents():
        parts.append(f"\n## {title}\n\n{where} Model: `{model.__module__}.{model.__name__}`.\n")
        parts.append("| key | type | default | description |\n|---|---|---|---|")
        for path, kind, default, description in _rows(model):
            parts.append(f"| `{path}` | {kind} | {default} | {description} |")
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_reference())
