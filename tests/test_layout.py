"""
The shape of C{shifter/}: packages by concern, each importing only the ones
below it, and no circle of imports between modules (README, Layout).

Every C{import} and C{from ... import} is read from the source with C{ast},
wherever it stands: at module level, in a function (a lazy import), under
C{if TYPE_CHECKING:}, relative or absolute.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

SOURCE = Path(__file__).resolve().parent.parent / "shifter"

# The layers, lowest first.  A module may import its own package and the
# packages of a lower rank, never one of its own rank or above: the
# resolvers, the upstream side and the relays know nothing of each other.
RANKS = {
    "shifter.interfaces": 0,  # the interfaces the lower layers report through
    "shifter.logs": 0,  # log helpers; twistd --logger shifter.logs.json names it
    "shifter.transports": 0,  # the TCP transports of client and proxy connections
    "shifter.kernel": 1,
    "shifter.resolvers": 2,
    "shifter.upstream": 2,
    "shifter.relay": 2,
    "shifter.pac": 2,
    "shifter.tunnel": 3,
    "shifter.service": 4,
    "shifter.admin": 5,
}

# The doors in from outside: the public names (shifter/__init__.py, which
# loads them lazily) and the commands run as python -m shifter.X (and
# python -m shifter).  They may import anything, and nothing in shifter/
# imports them.
ENTRIES = ("shifter", "shifter.__main__", "shifter.rules", "shifter.ctl", "shifter.doctor", "shifter.kmod")


def modules(source: Path) -> dict[str, Path]:
    """
    Every module under C{source} (a C{shifter/} directory) by dotted name;
    a package by its own name (its C{__init__.py}).
    """
    found = {}
    for path in sorted(source.rglob("*.py")):
        parts = list(path.relative_to(source.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def importsOf(name: str, path: Path, known: set[str]) -> Iterator[tuple[int, str]]:
    """
    (line, module) for every module of C{known} that the module C{name}
    (at C{path}) imports, anywhere in its source.
    """
    isPackage = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, _deepest(alias.name, known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if isPackage else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            for alias in node.names:
                yield node.lineno, _deepest(f"{base}.{alias.name}", known)


def _deepest(dotted: str, known: set[str]) -> str:
    """
    The module that C{dotted} names: itself, or the longest prefix of it
    that is a module (C{shifter.relay.relay.openRelay} is
    C{shifter.relay.relay}); C{""} for something outside C{shifter}.
    """
    parts = dotted.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return ""


def layerOf(name: str) -> str | None:
    """
    The entry in L{ENTRIES} or L{RANKS} that C{name} belongs to, else
    C{None}.
    """
    for entry in ENTRIES:
        if name == entry or (entry != "shifter" and name.startswith(entry + ".")):
            return entry
    for layer in RANKS:
        if name == layer or name.startswith(layer + "."):
            return layer
    return None


def graph(source: Path) -> dict[str, set[tuple[int, str]]]:
    """
    Each module's imports of other modules of C{source}, with their lines.
    An import of the root package C{shifter} is left out: every module
    loads it as its parent, and its names are checked apart.
    """
    found = modules(source)
    known = set(found)
    edges: dict[str, set[tuple[int, str]]] = {}
    for name, path in found.items():
        edges[name] = {
            (line, target)
            for line, target in importsOf(name, path, known)
            if target and target != name and target != "shifter"
        }
    return edges


def wrongImports(source: Path) -> list[str]:
    """
    Every import under C{source} that does not point down, and every module
    that is in no layer, one line each.
    """
    problems = []
    for name, imports in sorted(graph(source).items()):
        layer = layerOf(name)
        if layer is None:
            problems.append(f"{name}: in no package of the layout (tests/test_layout.py RANKS)")
            continue
        for line, target in sorted(imports):
            targetLayer = layerOf(target)
            if targetLayer == layer:
                continue
            if targetLayer in ENTRIES:
                problems.append(f"{name}:{line} imports {target}, an entry point")
            elif targetLayer is None:
                problems.append(f"{name}:{line} imports {target}, in no package of the layout")
            elif layer not in ENTRIES and RANKS[targetLayer] >= RANKS[layer]:
                problems.append(
                    f"{name}:{line} imports {target}: {layer} (rank {RANKS[layer]}) may not "
                    f"import {targetLayer} (rank {RANKS[targetLayer]})"
                )
    return problems


def cycles(source: Path) -> list[list[str]]:
    """
    The circles of imports between modules under C{source}: each strongly
    connected set of more than one module, sorted.
    """
    edges = {name: {target for _, target in imports} for name, imports in graph(source).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    onStack: set[str] = set()
    found: list[list[str]] = []

    def visit(name: str) -> None:
        index[name] = low[name] = len(index)
        stack.append(name)
        onStack.add(name)
        for target in edges.get(name, ()):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in onStack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            component = []
            while True:
                member = stack.pop()
                onStack.discard(member)
                component.append(member)
                if member == name:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for name in sorted(edges):
        if name not in index:
            visit(name)
    return sorted(found)


class LayoutTests(SynchronousTestCase):
    """
    C{shifter/} as it is.
    """

    def test_importsPointDown(self) -> None:
        """
        Every module is in a package of the layout (or is an entry point),
        and imports only its own package and those of a lower rank.
        """
        self.assertEqual(wrongImports(SOURCE), [])

    def test_noCycles(self) -> None:
        """
        No module imports itself through others.
        """
        self.assertEqual(cycles(SOURCE), [])

    def test_everyPackageNamed(self) -> None:
        """
        Every package under C{shifter/} is a layer or an entry point, and
        every layer exists.
        """
        packages = {name for name, path in modules(SOURCE).items() if path.name == "__init__.py"}
        self.assertEqual(packages - set(RANKS) - set(ENTRIES), set())
        for layer in RANKS:
            self.assertIn(layer, modules(SOURCE), f"{layer} is in RANKS but not in shifter/")


class CheckerTests(SynchronousTestCase):
    """
    The checks themselves, on small trees written for the test: each way an
    import can be written is seen.
    """

    def tree(self, files: dict[str, str]) -> Path:
        source = Path(self.mktemp()) / "shifter"
        for package in ("", "kernel", "resolvers", "upstream", "tunnel", "service"):
            (source / package).mkdir(parents=True, exist_ok=True)
            (source / package / "__init__.py").write_text('"""A package."""\n')
        for relative, text in files.items():
            (source / relative).write_text(text)
        return source

    def test_clean(self) -> None:
        """
        Imports downwards and within a package are accepted.
        """
        source = self.tree({
            "kernel/codec.py": "",
            "tunnel/machine.py": "from shifter.kernel.codec import x\nfrom shifter.tunnel import other\n",
            "tunnel/other.py": "import shifter.kernel.codec\n",
        })
        self.assertEqual((wrongImports(source), cycles(source)), ([], []))

    def test_upwardAtModuleLevel(self) -> None:
        """
        C{from X import y} of a higher package is refused.
        """
        source = self.tree({
            "service/tap.py": "",
            "tunnel/machine.py": "from shifter.service.tap import Options\n",
        })
        self.assertEqual(
            wrongImports(source),
            ["shifter.tunnel.machine:1 imports shifter.service.tap: shifter.tunnel (rank 3) "
             "may not import shifter.service (rank 4)"],
        )

    def test_upwardInFunction(self) -> None:
        """
        A lazy C{import X} inside a function is seen too.
        """
        source = self.tree({
            "service/tap.py": "",
            "kernel/codec.py": "def f():\n    import shifter.service.tap\n",
        })
        self.assertEqual(len(wrongImports(source)), 1)
        self.assertIn("shifter.kernel.codec:2 imports shifter.service.tap", wrongImports(source)[0])

    def test_upwardRelative(self) -> None:
        """
        A relative import that climbs to a higher package is seen.
        """
        source = self.tree({
            "service/tap.py": "",
            "tunnel/machine.py": "from ..service import tap\n",
        })
        self.assertEqual(len(wrongImports(source)), 1)
        self.assertIn("imports shifter.service.tap", wrongImports(source)[0])

    def test_sameRankSibling(self) -> None:
        """
        A package may not import another of its own rank.
        """
        source = self.tree({"upstream/connect.py": "", "resolvers/r.py": "import shifter.upstream.connect\n"})
        self.assertEqual(
            wrongImports(source),
            ["shifter.resolvers.r:1 imports shifter.upstream.connect: shifter.resolvers (rank 2) "
             "may not import shifter.upstream (rank 2)"],
        )

    def test_entryPointImported(self) -> None:
        """
        Nothing imports an entry point, not even a higher package.
        """
        source = self.tree({"rules.py": "", "service/tap.py": "from shifter.rules import main\n"})
        self.assertIn("entry point", wrongImports(source)[0])

    def test_unplacedModule(self) -> None:
        """
        A module outside the layout is named.
        """
        source = self.tree({"stray.py": ""})
        self.assertEqual(
            wrongImports(source), ["shifter.stray: in no package of the layout (tests/test_layout.py RANKS)"]
        )

    def test_cycle(self) -> None:
        """
        Two modules of one package importing each other, one of them
        lazily, are a circle.
        """
        source = self.tree({
            "tunnel/a.py": "from shifter.tunnel.b import x\n",
            "tunnel/b.py": "def f():\n    from shifter.tunnel import a\n",
        })
        self.assertEqual(cycles(source), [["shifter.tunnel.a", "shifter.tunnel.b"]])
