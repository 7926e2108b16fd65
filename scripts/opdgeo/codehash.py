"""The code an `opdgeo` subcommand runs, as a short text that changes with that code, but not
with a comment, a docstring or formatting. The workflow passes it to each rule as a param, so
that Snakemake reruns exactly the jobs whose code changed (workflow/rules/common.smk).

The code of a command is derived from the source, never listed by hand: the console entry
point and the command's handler in the modules that dispatch subcommands (only the functions
they reach by name, so another command's handler is not this command's code), and every
package module those import, transitively and whole (a module whose function a string names
as 'module:function', imported when it is called, counts as imported). Each module counts as
a hash of its syntax tree without docstrings, so comments, docstrings and formatting change
nothing. The pinned versions (envs/requirements.txt) of the distributions those modules
import, and of the pinned distributions these require, count too: a new torch pin reruns what
imports torch.
"""

import ast
import gc
import hashlib
import json
import re
import sys
from contextlib import contextmanager
from functools import cache
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PACKAGE = Path(__file__).resolve().parent


def code_text(commands: list[str], requirements: Path, package: Path = PACKAGE) -> str:
    """'figure: cli=1a2b3c4d figures=... | matplotlib==3.11.2 ...' for the given subcommands
    of the package's source in `package`: one short hash per module (so that Snakemake's
    rerun reason shows which one changed) and the pins the code depends on."""
    modules, imported = {}, set()
    with _collector_paused():
        for command in commands:
            code, names = command_code(command, package)
            modules |= code
            imported |= names
    hashes = " ".join(f"{name}={digest}" for name, digest in sorted(modules.items()))
    pins = " ".join(pinned_dependencies(frozenset(imported), requirements))
    return f"{' '.join(sorted(set(commands)))}: {hashes} | {pins}".rstrip(" |")


@contextmanager
def _collector_paused():
    """Python's cycle collector off: hashing allocates some 10^5 containers (syntax trees,
    their dumps), none in a cycle, and each collection they trigger walks every live object,
    Snakemake's too; with it on, hashing took about twice the CPU."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@cache
def subcommands() -> dict:
    """Subcommand -> handler, from the `opdgeo` parser itself."""
    from opdgeo import cli

    parser = cli.build_parser()
    (action,) = (a for a in parser._actions if a.dest == "command")
    return {name: sub.get_default("handler") for name, sub in action.choices.items()}


def command_code(command: str, package: Path = PACKAGE) -> tuple[dict[str, str], frozenset[str]]:
    """The code `opdgeo <command>` runs, as module -> hash (of the whole module, or of the
    reached part of a dispatch module), and the third-party modules that code imports."""
    from opdgeo import cli

    handlers = subcommands()
    if command not in handlers:
        raise ValueError(f"`opdgeo {command}` is no subcommand (known: {sorted(handlers)})")
    own = handlers[command]
    dispatch = {h.__module__ for h in handlers.values()}
    others = {(h.__module__, h.__name__) for h in handlers.values() if h is not own}
    walk = _Walk(package, dispatch, others)
    walk.reach(cli.__name__, cli.command.__name__)  # the console entry point (pyproject.toml)
    walk.reach(own.__module__, own.__name__)
    return walk.code(), frozenset(walk.third_party)


class _Walk:
    """Modules and functions reachable from the roots given to `reach`."""

    def __init__(self, package: Path, dispatch: set[str], excluded: set[tuple[str, str]]):
        self.package, self.dispatch, self.excluded = package, dispatch, excluded
        self.whole: set[str] = set()
        self.reached: dict[str, set[str]] = {}  # dispatch module -> reached top-level names
        self.third_party: set[str] = set()
        self.trees: dict[str, ast.Module | None] = {}  # module -> its syntax tree, if a file

    def reach(self, module: str, name: str | None = None):
        """Include `module` (its package's __init__ too); in a dispatch module, `name` and
        what it references by name; elsewhere, the whole module."""
        parts = module.split(".")
        for depth in range(1, len(parts)):
            self._include_whole(".".join(parts[:depth]))
        if module not in self.dispatch:
            self._include_whole(module)
            return
        first = module not in self.reached
        names = self.reached.setdefault(module, set())
        tree = self._tree(module)
        if first:  # statements that run on import: always
            for statement in tree.body:
                if not _is_definition(statement):
                    self._follow(module, statement)
        if name is None or name in names or (module, name) in self.excluded:
            return
        names.add(name)
        for statement in _definitions(tree).get(name, ()):
            self._follow(module, statement)

    def _include_whole(self, module: str):
        if module in self.whole or self._tree(module) is None:
            return
        self.whole.add(module)
        self._follow(module, self._tree(module))

    def _follow(self, module: str, node: ast.AST):
        """Follow the imports in `node`, the package functions it names as 'module:function'
        (imported when called: the figures' drawing functions), and (in a dispatch module) the
        names it uses."""
        imports, attributes, names, references = _uses(node)
        bound = dict(self._top_level_bindings(module))  # local name -> dispatch module
        for statement in imports:
            bound |= self._imports(module, statement)
        for target, name in references:
            if self._is_ours(target) and self._tree(target) is not None:
                self.reach(target, name)
        for base, attribute in attributes:
            if base in bound:  # dispatch_module.attribute
                self.reach(bound[base], attribute)
        if module in self.dispatch:
            for name in names & _definitions(self._tree(module)).keys():
                self.reach(module, name)

    def _top_level_bindings(self, module: str) -> dict[str, str]:
        bound = {}
        for statement in self._tree(module).body:
            if isinstance(statement, ast.Import | ast.ImportFrom):
                bound |= self._imports(module, statement)
        return bound

    def _imports(self, module: str, node: ast.Import | ast.ImportFrom) -> dict[str, str]:
        """Reach what an import statement imports; return the dispatch modules it binds."""
        bound = {}
        if isinstance(node, ast.Import):
            for alias in node.names:
                if self._is_ours(alias.name):
                    self.reach(alias.name)
                    if alias.asname and alias.name in self.dispatch:
                        bound[alias.asname] = alias.name
                else:
                    self._third_party(alias.name)
            return bound
        base = node.module
        if node.level:  # relative: from the module's package up
            package = module.split(".")
            if self._path(module).name != "__init__.py":
                package = package[:-1]
            base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""])
            base = base.rstrip(".")
        if not self._is_ours(base):
            self._third_party(base)
            return bound
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            if self._tree(submodule) is not None:  # `from package import module`
                self.reach(submodule)
                if submodule in self.dispatch:
                    bound[alias.asname or alias.name] = submodule
            else:
                self.reach(base, alias.name)
        return bound

    def _is_ours(self, module: str) -> bool:
        return module.split(".")[0] == __package__

    def _third_party(self, module: str):
        top = module.split(".")[0]
        if top not in sys.stdlib_module_names:
            self.third_party.add(top)

    def _path(self, module: str) -> Path | None:
        """The file of a package module ('opdgeo.delta.io'), None if there is none."""
        folder = self.package.joinpath(*module.split(".")[1:])
        for path in (folder / "__init__.py", folder.with_suffix(".py")):
            if path.is_file():
                return path
        return None

    def _tree(self, module: str) -> ast.Module | None:
        if module not in self.trees:
            path = self._path(module)
            self.trees[module] = path and _parse(path.read_text())
        return self.trees[module]

    def code(self) -> dict[str, str]:
        code = {name: _digest(self._tree(name)) for name in self.whole}
        for module, names in self.reached.items():
            tree = self._tree(module)
            statements = [s for s in tree.body if not _is_definition(s)]
            statements += [s for name in sorted(names) for s in _definitions(tree)[name]]
            code[module] = _digest(ast.Module(body=statements, type_ignores=[]))
        code = {name.removeprefix(f"{__package__}."): digest for name, digest in code.items()}
        for module in [*self.whole, *self.reached]:
            for data in _data_files(self._tree(module), self.package.parent.parent / "config"):
                code[f"config/{data.name}"] = _data_digest(data)
        return code


def pinned_dependencies(imported: frozenset[str], requirements: Path) -> list[str]:
    """The pins in `requirements` of the distributions that provide the imported top-level
    modules, and of the pinned distributions those require, transitively, as 'name==1.2'."""
    pins = _pins(requirements)
    providers = _providers()
    todo = [canonicalize_name(d) for name in imported for d in providers.get(name, [name])]
    needed = set()
    while todo:
        dist = todo.pop()
        if dist in pins and dist not in needed:
            needed.add(dist)
            todo.extend(_required(dist))
    return sorted(pins[dist] for dist in needed)


@cache
def _providers() -> dict[str, list[str]]:
    return packages_distributions()


@cache
def _required(dist: str) -> list[str]:
    """The distributions `dist` requires here (extras aside)."""
    try:
        lines = requires(dist) or []
    except PackageNotFoundError:
        return []
    requirements = [Requirement(line) for line in lines if "extra" not in line]
    return [canonicalize_name(r.name) for r in requirements
            if r.marker is None or r.marker.evaluate()]


@cache
def _pins(requirements: Path) -> dict[str, str]:
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            pins[canonicalize_name(requirement.name)] = f"{requirement.name}{requirement.specifier}"
    return pins


# ------------------------------------------------------------------ source, parsed and normalised


@cache
def _parse(source: str) -> ast.Module:
    return ast.parse(source)


def _is_definition(statement: ast.stmt) -> bool:
    return isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)


# A function named by a string, as in an entry point: "opdgeo.figures.overview:fig1_overview".
REFERENCE = re.compile(r"([A-Za-z_][\w.]*):([A-Za-z_]\w*)")


@cache
def _uses(node: ast.AST) -> tuple[list, set[tuple[str, str]], set[str], set[tuple[str, str]]]:
    """The import statements in `node`, its `name.attribute` pairs, the names it reads and the
    (module, function) pairs its strings name as 'module:function'."""
    imports, attributes, names, references = [], set(), set(), set()
    for child in ast.walk(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            imports.append(child)
        elif isinstance(child, ast.Attribute) and isinstance(child.value, ast.Name):
            attributes.add((child.value.id, child.attr))
        elif isinstance(child, ast.Name):
            names.add(child.id)
        elif isinstance(child, ast.Constant) and isinstance(child.value, str) and (
                match := REFERENCE.fullmatch(child.value)):
            references.add(match.groups())
    return imports, attributes, names, references


@cache
def _definitions(tree: ast.Module) -> dict[str, list[ast.stmt]]:
    """Top-level name -> the statements that bind it (defs, classes, assignments, imports)."""
    bound = {}
    for statement in tree.body:
        if _is_definition(statement):
            names = [statement.name]
        elif isinstance(statement, ast.Import | ast.ImportFrom):
            names = [(a.asname or a.name).split(".")[0] for a in statement.names]
        else:
            names = [n.id for n in ast.walk(statement)
                     if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)]
        for name in names:
            bound.setdefault(name, []).append(statement)
    return bound


def _normalised(node: ast.AST) -> str:
    """The syntax tree without docstrings, positions and the fields a Python version adds
    empty (so that the text is the same on every Python that parses the code alike)."""
    return repr(_dumped(node))


def _dumped(node: ast.AST) -> tuple:
    """`node` as (type, [(field, value), ...]), its docstring and its empty fields left out.
    Every node of the package passes here at each Snakemake start, hence the plain loops."""
    fields = []
    for field in node._fields:
        value = getattr(node, field, None)
        if value is None:
            continue
        if isinstance(value, ast.AST):
            value = _dumped(value)
        elif isinstance(value, list):
            if field == "body" and value and _is_docstring(value[0]):
                value = value[1:]
            if not value:
                continue
            value = [_dumped_item(item) for item in value]
        fields.append((field, value))
    return (type(node).__name__, fields)


# A statement once: every command's code holds the dispatch modules' statements it reaches.
_dumped_statement = cache(_dumped)


def _dumped_item(value):
    if isinstance(value, ast.stmt):
        return _dumped_statement(value)
    if isinstance(value, ast.AST):
        return _dumped(value)
    if isinstance(value, list):
        return [_dumped_item(item) for item in value]
    return value


def _is_docstring(statement: ast.stmt) -> bool:
    return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
            and isinstance(statement.value.value, str))


def _data_files(tree: ast.Module, folder: Path) -> list[Path]:
    """The repository's data files a module reads, written as `... / "config" / "name.yaml"`
    (the paper's reference numbers, the hub models' facts): part of its code."""
    return [folder / name for parent, name in _path_pairs(tree)
            if parent == folder.name and (folder / name).is_file()]


@cache
def _path_pairs(tree: ast.Module) -> tuple[tuple[str, str], ...]:
    """The constants of every `... / "parent" / "name"` in a module (once per module)."""
    return tuple((node.left.right.value, str(node.right.value)) for node in ast.walk(tree)
                 if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)
                 and isinstance(node.right, ast.Constant) and isinstance(node.left, ast.BinOp)
                 and isinstance(node.left.right, ast.Constant))


def _data_digest(path: Path) -> str:
    """A YAML file's content, not its comments or layout."""
    return _content_digest(path.read_text())


@cache
def _content_digest(text: str) -> str:
    content = json.dumps(yaml.safe_load(text), sort_keys=True, default=str)
    return hashlib.sha256(content.encode()).hexdigest()[:8]


@cache
def _digest(node: ast.AST) -> str:
    return hashlib.sha256(_normalised(node).encode()).hexdigest()[:8]
