"""A pipeline as plain data: stages, their parameters, inputs and references.

A stage declares a callable (``_target_``), ``params`` (literal keyword arguments)
and ``inputs`` (keyword arguments that may be references to another stage's
output, written ``"@stage.output"``). References define the graph; the graph is
checked up front: unknown targets, dangling references and cycles are errors that
name the stage.
"""

from __future__ import annotations

import graphlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import PipelineError
from .code_fingerprint import code_fingerprint

REF_PREFIX = "@"


@dataclass(frozen=True)
class Ref:
    """``@stage.output``: the output named ``output`` of stage ``stage``."""

    stage: str
    output: str

    @classmethod
    def parse(cls, text: str, where: str) -> "Ref":
        body = text[len(REF_PREFIX) :]
        stage, dot, output = body.partition(".")
        if not stage or not dot or not output:
            raise PipelineError(f"{where}: bad reference {text!r} (expected '@stage.output')")
        return cls(stage, output)

    def __str__(self) -> str:
        return f"{REF_PREFIX}{self.stage}.{self.output}"


@dataclass
class StageSpec:
    name: str
    target: str
    fn: Callable[..., Any]
    params: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)  # values or Ref
    cache: bool = True  # may the stage cache reuse an earlier execution?
    # What code ``fn`` runs (see code_fingerprint); part of the stage cache key.
    # Taken when the spec is made, so the key and the manifest name the same code.
    code: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.code:
            named = self.target.rpartition(".")[0] if isinstance(self.target, str) else None
            self.code = code_fingerprint(self.fn, named_module=named)

    def refs(self) -> list[Ref]:
        return [v for v in self.inputs.values() if isinstance(v, Ref)]


@dataclass
class Pipeline:
    name: str
    stages: dict[str, StageSpec]

    def order(self) -> list[str]:
        return list(self.sorter().static_order())

    def sorter(self) -> graphlib.TopologicalSorter:
        graph = {name: {r.stage for r in spec.refs()} for name, spec in self.stages.items()}
        return graphlib.TopologicalSorter(graph)

    def downstream(self, name: str) -> set[str]:
        """Every stage that depends, directly or not, on ``name``."""
        out: set[str] = set()
        frontier = {name}
        while frontier:
            nxt = {s for s, spec in self.stages.items() if any(r.stage in frontier for r in spec.refs())}
            frontier = nxt - out
            out |= nxt
        return out


def _parse_inputs(name: str, inputs: dict[str, Any]) -> dict[str, Any]:
    parsed = {}
    for key, value in inputs.items():
        if isinstance(value, str) and value.startswith(REF_PREFIX):
            parsed[key] = Ref.parse(value, f"stage {name!r} input {key!r}")
        else:
            parsed[key] = value
    return parsed


def resolve_target(name: str, target: Any) -> Callable[..., Any]:
    """The callable ``target`` names. A module that is missing makes an unknown target;
    a module that exists but fails to import is reported with its own error."""
    if not isinstance(target, str) or not target:
        raise PipelineError(f"stage {name!r}: missing _target_")
    module_name, _, attr = target.rpartition(".")
    if module_name:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not exc.name or not (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise PipelineError(f"stage {name!r}: target {target!r}: importing {module_name} failed: "
                                    f"ModuleNotFoundError: {exc}") from None
            return _nested_attribute(name, target)  # maybe ``module.Class.method``
        except (Exception, SystemExit) as exc:  # a SyntaxError, anything the module raises or exits with as it loads
            raise PipelineError(f"stage {name!r}: target {target!r}: importing {module_name} failed: "
                                f"{type(exc).__name__}: {_one_line(exc)}") from None
        if module is not None:
            fn = getattr(module, attr, None)
            if fn is None:
                raise PipelineError(f"stage {name!r}: unknown target {target!r} (module {module_name} has no {attr!r})")
            if not callable(fn):
                raise PipelineError(f"stage {name!r}: target {target!r} is not callable")
            return fn
    raise PipelineError(f"stage {name!r}: unknown target {target!r} (expected module.function)")


def _nested_attribute(name: str, target: str) -> Callable[..., Any]:
    parts = target.split(".")
    for cut in range(len(parts) - 2, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr, None)
        if callable(obj):
            return obj
        break
    raise PipelineError(f"stage {name!r}: unknown target {target!r}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_pipeline(name: str, stages: dict[str, dict[str, Any]]) -> Pipeline:
    """Validate a plain ``{stage: {_target_, params, inputs, cache}}`` mapping into a Pipeline."""
    if not stages:
        raise PipelineError(f"pipeline {name!r} has no stages")
    specs: dict[str, StageSpec] = {}
    for stage_name, raw in stages.items():
        if not isinstance(raw, dict):
            raise PipelineError(f"stage {stage_name!r}: expected a mapping, got {type(raw).__name__}")
        unknown = set(raw) - {"_target_", "params", "inputs", "cache"}
        if unknown:
            raise PipelineError(f"stage {stage_name!r}: unknown keys {sorted(unknown)}")
        target = raw.get("_target_")
        specs[stage_name] = StageSpec(
            name=stage_name,
            target=target,
            fn=resolve_target(stage_name, target),
            params=dict(raw.get("params") or {}),
            inputs=_parse_inputs(stage_name, dict(raw.get("inputs") or {})),
            cache=bool(raw.get("cache", True)),
        )
    for spec in specs.values():
        for key, ref in ((k, v) for k, v in spec.inputs.items() if isinstance(v, Ref)):
            if ref.stage not in specs:
                raise PipelineError(f"stage {spec.name!r} input {key!r}: no stage named {ref.stage!r}")
    pipeline = Pipeline(name, specs)
    try:
        pipeline.sorter().prepare()
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        raise PipelineError(f"pipeline {name!r} has a cycle: {' -> '.join(cycle)}") from None
    return pipeline
