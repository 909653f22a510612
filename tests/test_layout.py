"""The architecture as a rule: who may import whom, read from the source with ast (not grep).

    cache_schema          the contract: imports nothing of the project, and never torch; inside it, layers
                          errors <- storage <- format <- reading, writing <- operations (reading and
                          writing never import each other; a layer never imports one above it)
    stages.core           shared home of the stages: imports cache_schema and itself only;
                          outside stages.core.encoders it never imports the encoders; inside it,
                          runtime, data, files <- diffusion <- model, and encoders beside them
                          (errors, options and planning are leaves anyone may use)
    stages.encode/sample  cache_schema, stages.core and themselves
    stages.train          the same minus stages.core.encoders, and no diffusers/transformers
    stages.demo           cache_schema, stages.core and itself
    pipeline              anything; nothing outside pipeline imports it
and no import cycle between modules, counting imports inside functions too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .encode_helpers import ROOT, cli_imports

PACKAGES = ("cache_schema", "stages", "pipeline")
ENCODER_LIBRARIES = ("diffusers", "transformers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``name`` imports (top level or inside functions), relative imports resolved;
    ``from package import submodule`` counts as importing the submodule."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            out.add(target)
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    out.add(f"{target}.{alias.name}")
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


# cache_schema's layers, and what each may import besides itself and cache_schema.errors.
SCHEMA_LAYERS = {
    "storage": set(),
    "format": {"storage"},
    "reading": {"storage", "format"},
    "writing": {"storage", "format"},
    "operations": {"storage", "format", "reading"},
}


def schema_layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SCHEMA_LAYERS else None


# stages.core's subpackages, and which others each may import (its top-level modules are open to all).
CORE_LAYERS = {
    "runtime": set(),
    "data": set(),
    "files": set(),
    "diffusion": {"runtime", "data", "files"},
    "model": {"runtime", "data", "files", "diffusion"},
    "encoders": {"runtime", "data", "files"},
}


def core_layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["stages", "core"] and parts[2] in CORE_LAYERS else None


def allowed(importer: str, target: str) -> bool:
    """Whether ``importer`` (a project module) may import ``target`` (any module)."""
    top = target.split(".")[0]
    if within(importer, "cache_schema"):
        if top in ("stages", "pipeline", "torch"):
            return False
        if top != "cache_schema" or importer == "cache_schema" or target in ("cache_schema", "cache_schema.errors"):
            return True
        mine, theirs = schema_layer(importer), schema_layer(target)
        return mine is not None and theirs is not None and (theirs == mine or theirs in SCHEMA_LAYERS[mine])
    if top not in PACKAGES:
        return not (within(importer, "stages.train") and top in ENCODER_LIBRARIES)
    if within(target, "pipeline"):
        return within(importer, "pipeline")
    if within(importer, "pipeline") or within(target, "cache_schema"):
        return True
    if within(target, "stages.core.encoders"):
        return within(importer, "stages.core.encoders") or any(
            within(importer, f"stages.{stage}") for stage in ("encode", "sample", "demo"))
    if within(target, "stages.core") or target == "stages":
        mine, theirs = core_layer(importer), core_layer(target)
        return mine is None or theirs is None or theirs == mine or theirs in CORE_LAYERS[mine]
    own = ".".join(importer.split(".")[:2])  # stages.<stage>
    return within(target, own)


def test_every_import_follows_the_layout(graph):
    broken = sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets if not allowed(m, t))
    assert broken == [], "imports that break the layout rules:\n" + "\n".join(broken)


def test_the_rule_checker_catches_each_kind_of_bad_arrow():
    assert not allowed("cache_schema.reading.reader", "torch")
    assert not allowed("cache_schema.storage.fsutil", "cache_schema.format.layout")
    assert not allowed("cache_schema.format.manifest", "cache_schema.reading.reader")
    assert not allowed("cache_schema.reading.fast_reader", "cache_schema.writing.writer")
    assert not allowed("cache_schema.writing.writer", "cache_schema.operations.verify")
    assert allowed("cache_schema.operations.verify", "cache_schema.reading.reader")
    assert not allowed("cache_schema.writing.writer", "stages.core.errors")
    assert not allowed("stages.core.files.checkpoint", "stages.core.model.sit")
    assert not allowed("stages.core.diffusion.objective", "stages.core.model.network")
    assert not allowed("stages.core.runtime.stop", "stages.core.data.split")
    assert allowed("stages.core.model.sit", "stages.core.diffusion.family")
    assert not allowed("stages.train.loop", "stages.core.encoders.load")
    assert not allowed("stages.train.loop", "transformers")
    assert not allowed("stages.core.model.sit", "stages.core.encoders.captions")
    assert not allowed("stages.sample.run", "stages.train.data")
    assert not allowed("stages.train.previews", "stages.sample.decode")
    assert not allowed("stages.demo.tiny_encoders", "stages.encode.run")
    assert not allowed("stages.core.options", "pipeline.config")
    assert allowed("stages.sample.run", "stages.core.encoders.load") and allowed("pipeline.cli", "stages.train.loop")


def test_no_import_cycles(graph):
    internal = {m: {t for t in ts if t in graph and t != m} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(internal[m]):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(internal):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["cache", "info", "CACHE"]], ids=" ".join)
def test_help_and_cache_info_import_no_heavy_library(args, train_cache):
    code, modules, stderr = cli_imports([str(train_cache) if a == "CACHE" else a for a in args], timeout=120)
    assert code == 0, stderr[-2000:]
    heavy = {m.split(".")[0] for m in modules} & {"torch", "zarr", "tensorstore", "diffusers", "transformers"}
    assert heavy == set()
