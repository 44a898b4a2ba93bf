"""Command-line options generated from the same pydantic fields as the Prefect form, so that a default, a bound or a
description is written once (on the field) and the CLI can only show and check what the flow will accept.

    options = FlowOptions(parser)
    options.add_flow(training)             # one option per field of each pydantic parameter, one per scalar parameter
    kwargs = options.values(args)          # the flow's keyword arguments, validated; only what the user gave is set

Field `max_length` becomes `--max-length INT`, its help the field's description followed by its default and its
bounds ("(default: 128; 8 <= value <= 8192)"); `Literal` fields take `choices`; `bool` fields are `--flag /
--no-flag`; an `Optional` field takes '' to mean unset. Options the user leaves out are not passed at all, so the
flow's (the model's) defaults apply. A value the field rejects is a `CliError` naming the option and the bound,
which `values` turns into argparse's usage message and exit status 2."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shutil
import textwrap
import types
import typing
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

_METAVARS = {bool: "{true,false}", int: "INT", float: "FLOAT", str: "TEXT"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One generated option: `--flag` sets field `field` of flow parameter `parameter` (or the parameter itself)."""

    flag: str
    parameter: str
    field: str | None
    info: FieldInfo
    default: Any

    @property
    def dest(self) -> str:
        return self.parameter if self.field is None else f"{self.parameter}.{self.field}"


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(annotation)):
            return args[0], True
    return annotation, False


def _model_of(annotation: Any) -> type[BaseModel] | None:
    inner, _ = _unwrap_optional(annotation)
    return inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None


def _shown(value: Any) -> str:
    if isinstance(value, list | tuple):  # as typed: --class-weighted-losses false true
        return " ".join(str(v).lower() if isinstance(v, bool) else _shown(v) for v in value)
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def bounds_text(info: FieldInfo) -> str:
    """'1 <= value <= 50', '0 < value < 0.5', 'value >= 0', '1 to 256 characters'; '' without bounds."""
    low = high = ""
    min_len = max_len = None
    for item in info.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"{item.ge} <= "
        elif isinstance(item, annotated_types.Gt):
            low = f"{item.gt} < "
        elif isinstance(item, annotated_types.Le):
            high = f" <= {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f" < {item.lt}"
        elif isinstance(item, annotated_types.MinLen):
            min_len = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            max_len = item.max_length
    if min_len is not None or max_len is not None:
        return f"{min_len or 0} to {max_len} characters" if max_len is not None else f"at least {min_len} characters"
    if low and high:
        return f"{low}value{high}"
    if low:  # 'value >= 1' reads better than '1 <= value'
        bound, op = low.split()[0], {"<=": ">=", "<": ">"}[low.split()[1]]
        return f"value {op} {bound}"
    return f"value{high}" if high else ""


class HelpFormatter(argparse.HelpFormatter):
    """Help that never breaks a value at a hyphen ('all-MiniLM-L6-v2', 'text-classifier') and keeps the paragraphs
    of a description."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32, width=min(120, shutil.get_terminal_size().columns))

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
        return "\n\n".join(
            textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent, break_on_hyphens=False)
            for p in paragraphs
        )


def parameter_field(flow: Any, name: str) -> FieldInfo:
    """The field (type, default, bounds, description) of one parameter of a flow or function."""
    fn = getattr(flow, "fn", flow)
    hint = typing.get_type_hints(fn, include_extras=True)[name]
    default = inspect.signature(fn).parameters[name].default
    return (
        FieldInfo.from_annotation(hint)
        if default is inspect.Parameter.empty
        else FieldInfo.from_annotated_attribute(hint, default)
    )


class CliError(ValueError):
    """A value the user gave was rejected; the message names the option."""


class FlowOptions:
    """Options of one command, generated from flow parameters, pydantic models and single fields."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.options: dict[str, Option] = {}  # by dest
        self.models: dict[
            str, tuple[type[BaseModel], BaseModel | None, bool]
        ] = {}  # parameter -> (model, default, optional)
        self._flags: dict[str, str] = {}  # flag -> dest

    # -- building -----------------------------------------------------------------------------------------------

    def add_flow(
        self,
        flow: Any,
        *,
        exclude: tuple[str, ...] = (),
        notes: dict[str, str] | None = None,
        aliases: dict[str, list[str]] | None = None,
    ) -> FlowOptions:
        """Every parameter of a Prefect flow (or plain function): pydantic-model parameters become a group of
        options (`dataset.source` -> `--source`), `Annotated[..., Field(...)]` parameters one option each."""
        fn = getattr(flow, "fn", flow)
        hints = typing.get_type_hints(fn, include_extras=True)
        scalars = None
        for name, parameter in inspect.signature(fn).parameters.items():
            if name in exclude:
                continue
            hint = hints.get(name, Any)
            default = None if parameter.default is inspect.Parameter.empty else parameter.default
            model = _model_of(typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint)
            if model is not None:
                description = None
                if typing.get_origin(hint) is typing.Annotated:
                    description = FieldInfo.from_annotation(hint).description
                self.add_model(
                    name,
                    model,
                    default=default,
                    optional=parameter.default is None,
                    description=description,
                    notes=notes,
                    aliases=aliases,
                )
                continue
            info = parameter_field(flow, name)
            if scalars is None:
                scalars = self.parser.add_argument_group("flow parameters (the Prefect form's top-level fields)")
            self._add(scalars, name, None, info, info.get_default(), notes, aliases)
        return self

    def add_model(
        self,
        parameter: str,
        model: type[BaseModel],
        *,
        default: BaseModel | None = None,
        optional: bool = False,
        description: str | None = None,
        notes: dict[str, str] | None = None,
        aliases: dict[str, list[str]] | None = None,
        title: str | None = None,
    ) -> FlowOptions:
        own_doc = inspect.cleandoc(model.__dict__.get("__doc__") or "")  # not the docstring of a base class
        doc = (description or own_doc).split("\n\n")[0].replace("\n", " ")
        group = (
            self.parser
            if title == ""
            else self.parser.add_argument_group(  # '': the command's own options
                title or f"{parameter} (Prefect form: {parameter}.<field>)",
                " ".join(
                    part for part in (doc, "Unset unless one of these options is given." if optional else "") if part
                )
                or None,
            )
        )
        self.models[parameter] = (model, default, optional)
        for name, info in model.model_fields.items():
            if _model_of(info.annotation) is not None:
                raise TypeError(f"{model.__name__}.{name}: nested models are not supported as CLI options")
            shown = getattr(default, name) if isinstance(default, model) else info.get_default()
            self._add(group, name, parameter, info, shown, notes, aliases)
        return self

    def add_field(self, name: str, info: FieldInfo, *, note: str | None = None) -> FlowOptions:
        """One option from one field (for commands that are not flows)."""
        self._add(self.parser, name, None, info, info.get_default(), {name: note} if note else None, None)
        return self

    def _add(
        self,
        group: Any,
        name: str,
        parameter: str | None,
        info: FieldInfo,
        default: Any,
        notes: dict[str, str] | None,
        aliases: dict[str, list[str]] | None,
    ) -> None:
        flag = flag_name(name)
        if flag in self._flags and parameter:  # two models with one field name: the later one is --<model>-<field>
            flag = flag_name(f"{parameter}_{name}")
        option = Option(
            flag=flag, parameter=parameter or name, field=name if parameter else None, info=info, default=default
        )
        flags = [option.flag, *(aliases or {}).get(option.dest, [])]
        for flag in flags:
            if flag in self._flags:
                raise ValueError(
                    f"{flag} would set both {self._flags[flag]} and {option.dest}: rename one, or exclude it"
                )
            self._flags[flag] = option.dest
        self.options[option.dest] = option
        inner, optional = _unwrap_optional(info.annotation)
        required = info.is_required() and (parameter is None or not self.models[parameter][2])
        if not info.is_required():
            details = [f"default: {_shown(default)}"]
        else:
            details = [] if required else [f"needed with any other {parameter} option"]
        if bounds := bounds_text(info):
            details.append(bounds)
        note = (notes or {}).get(option.dest)
        text = (info.description or name.replace("_", " ")).rstrip()
        text += f" ({'; '.join(details)})" if details else ""
        if optional and default is not None:
            text += " Pass '' to unset."
        if note:
            text += f" {note}"
        kwargs: dict[str, Any] = {"dest": option.dest, "default": argparse.SUPPRESS}
        if typing.get_origin(inner) is list:  # --max-lengths 128 256: one or more values
            (item,) = typing.get_args(inner)
            item_info = FieldInfo.from_annotation(item)
            inner = item_info.annotation
            kwargs["nargs"] = "+"
            if item_bounds := bounds_text(item_info):
                text += f" Each value: {item_bounds}."
        kwargs["help"] = text.replace("%", "%%")
        if inner is bool and "nargs" not in kwargs:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(inner) is Literal:
            kwargs["choices"] = [str(choice) for choice in typing.get_args(inner)]
            kwargs["metavar"] = "{" + ",".join(kwargs["choices"]) + "}"
        elif inner in _METAVARS or (isinstance(inner, type) and issubclass(inner, str | int | float)):
            kwargs["metavar"] = _METAVARS.get(inner, "TEXT")
        elif getattr(inner, "__name__", "") == "Path":
            kwargs["metavar"] = "PATH"
        else:
            raise TypeError(f"{option.dest}: no CLI option for type {info.annotation!r}")
        if required and (parameter is None or not self.models[parameter][2]):
            kwargs["required"] = True
        group.add_argument(*flags, **kwargs)

    # -- reading ------------------------------------------------------------------------------------------------

    def _given(self, args: argparse.Namespace) -> dict[str, Any]:
        given = {}
        for dest, value in vars(args).items():
            option = self.options.get(dest)
            if option is None:
                continue
            if value == "" and _unwrap_optional(option.info.annotation)[1]:
                value = None
            given[dest] = value
        return given

    def _error(self, error: ValidationError, parameter: str, field: str | None) -> CliError:
        lines = []
        for item in error.errors():
            loc = [str(part) for part in item["loc"]]
            name = loc[0] if field is None and loc else field
            dest = f"{parameter}.{name}" if self.models.get(parameter) and name else parameter
            option = self.options.get(dest)
            where = option.flag if option else (dest if loc else parameter)
            got = item.get("input")
            got_text = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"{where}: {item['msg']}{got_text}")
        return CliError("\n  ".join(lines))

    def values(self, args: argparse.Namespace, fallbacks: dict[str, Any] | None = None) -> dict[str, Any]:
        """The flow's keyword arguments from what the user gave (then `fallbacks`); a rejected value prints which
        option and why, and exits with status 2 (argparse's status for usage errors)."""
        try:
            return self.parameters(args, fallbacks)
        except CliError as error:
            self.parser.exit(
                2,
                f"{self.parser.prog}: error: {error}\n"
                f"(`{self.parser.prog} --help` shows every option with its default and bounds)\n",
            )

    def parameters(self, args: argparse.Namespace, fallbacks: dict[str, Any] | None = None) -> dict[str, Any]:
        """Like `values`, but raises `CliError` (every rejected option, one per line)."""
        given = {**(fallbacks or {}), **self._given(args)}
        out: dict[str, Any] = {}
        problems: list[str] = []
        for dest, value in given.items():
            option = self.options[dest]
            if option.field is None:
                try:
                    adapter: TypeAdapter[Any] = TypeAdapter(typing.Annotated[option.info.annotation, option.info])  # type: ignore[arg-type]  # a field's annotation at run time
                    out[dest] = adapter.validate_python(value)
                except ValidationError as error:
                    problems.append(str(self._error(error, dest, None)))
        for parameter, (model, default, optional) in self.models.items():
            fields = {o.field: given[d] for d, o in self.options.items() if o.parameter == parameter and d in given}
            if not fields and (optional or default is not None):
                continue  # the flow's default (a model instance, or None)
            missing = [
                o.flag
                for o in self.options.values()
                if o.parameter == parameter and o.info.is_required() and o.field not in fields
            ]
            if optional and missing:
                problems.append(
                    f"{', '.join(missing)} is needed with "
                    f"{', '.join(self.options[f'{parameter}.{f}'].flag for f in fields)}"
                )
                continue
            base = default.model_dump(exclude_defaults=True) if isinstance(default, model) else {}
            try:
                out[parameter] = model.model_validate({**base, **fields})
            except ValidationError as error:
                problems.append(str(self._error(error, parameter, None)))
        if problems:
            raise CliError("\n  ".join(problems))
        return out
