"""three.js for the report's 3D viewer: find it on disk (or install it once with npm) and vendor it.

The repository does not carry three.js. It is looked up, in order, in ``$IDTO3D_THREE`` (a folder holding
``node_modules/three``, or the package folder itself), ``.ci/node/node_modules/three`` in a source checkout,
and ``$IDTO3D_CACHE/npm/node_modules/three`` (default ``~/.cache/idto3d/npm``); when none exists and
``npm`` is on PATH it is installed there once. Only the modules the viewer imports (and what they import)
are copied into a report, keeping their relative paths so the ES-module imports resolve.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from rich.console import Console

from idto3d.core.atomic import atomic_write

THREE_VERSION = "0.187.0"  # npm package `three`, MIT licence
# The viewer's entry modules, relative to the package folder; their relative imports are followed.
ENTRY_MODULES = (
    "build/three.module.js",
    "examples/jsm/loaders/GLTFLoader.js",
    "examples/jsm/controls/OrbitControls.js",
    "examples/jsm/environments/RoomEnvironment.js",
)
INSTALL_HINT = (f"install it with `npm install --prefix ~/.cache/idto3d/npm three@{THREE_VERSION}` "
                "(or point IDTO3D_THREE at a folder holding node_modules/three), then write the report again")
_NPM_TIMEOUT_S = 300
# Static import/export specifiers: `from './x.js'`, `import './x.js'`.
_SPECIFIER = re.compile(r"""(\bfrom\s*|\bimport\s*)(['"])([^'"\n]+)\2""")


def npm_cache_dir() -> Path:
    """``$IDTO3D_CACHE/npm``, or ``~/.cache/idto3d/npm`` when ``IDTO3D_CACHE`` is unset."""
    root = os.environ.get("IDTO3D_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "idto3d") / "npm"


def _source_checkout_dir() -> Path | None:
    root = Path(__file__).resolve().parents[3]
    return root / ".ci" / "node" / "node_modules" / "three" if (root / "pyproject.toml").is_file() else None


def _usable(package: Path) -> bool:
    return all((package / m).is_file() for m in ENTRY_MODULES)


def candidate_dirs() -> list[Path]:
    """Where three.js is looked for, in order of preference."""
    found: list[Path] = []
    env = os.environ.get("IDTO3D_THREE")
    if env:
        base = Path(env).expanduser()
        found += [base / "node_modules" / "three", base]
    checkout = _source_checkout_dir()
    if checkout is not None:
        found.append(checkout)
    found.append(npm_cache_dir() / "node_modules" / "three")
    return found


def package_version(package: Path) -> str:
    return str(json.loads((package / "package.json").read_text(encoding="utf-8")).get("version", "?"))


def find_three(install: bool = True, console: Console | None = None) -> Path | None:
    """The ``three`` package folder, installing it into the npm cache once when missing; None if impossible."""
    for package in candidate_dirs():
        if _usable(package):
            return package
    npm = shutil.which("npm")
    if not install or npm is None:
        return None
    prefix = npm_cache_dir()
    prefix.mkdir(parents=True, exist_ok=True)
    console = console or Console(stderr=True)
    console.print(f"installing three.js {THREE_VERSION} for the report's 3D viewer into {prefix} (npm, once) ...",
                  highlight=False)
    try:
        subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(prefix),
                        f"three@{THREE_VERSION}"], check=True, capture_output=True, text=True,
                       timeout=_NPM_TIMEOUT_S)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", None) or str(exc)
        console.print(f"[yellow]npm install of three.js failed:[/] {detail.strip().splitlines()[-1:]}",
                      highlight=False)
        return None
    package = prefix / "node_modules" / "three"
    return package if _usable(package) else None


def _relative_imports(source: str) -> list[str]:
    return [m.group(3) for m in _SPECIFIER.finditer(source) if m.group(3).startswith(("./", "../"))]


def module_closure(package: Path) -> list[str]:
    """The entry modules and every module they import relatively, as paths relative to ``package``."""
    seen: list[str] = []
    todo = list(ENTRY_MODULES)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        path = package / rel
        if not path.is_file():
            raise FileNotFoundError(f"three.js module {rel} is missing from {package}")
        seen.append(rel)
        base = Path(rel).parent
        for spec in _relative_imports(path.read_text(encoding="utf-8")):
            todo.append(os.path.normpath(base / spec).replace(os.sep, "/"))
    return sorted(seen)


def vendor_three(package: Path, dest: Path) -> list[str]:
    """Copy the viewer's modules (and the licence) to ``dest`` keeping relative paths; returns them."""
    files = module_closure(package)
    for rel in [*files, "LICENSE", "package.json"]:
        if (package / rel).is_file():
            atomic_write(dest / rel, lambda p, src=package / rel: shutil.copyfile(src, p))
    return files


def import_specifier(rel: str) -> str:
    """The bare specifier a module is known by: ``three``, ``three/addons/...`` or ``three/<path>``."""
    if rel == "build/three.module.js":
        return "three"
    if rel.startswith("examples/jsm/"):
        return "three/addons/" + rel[len("examples/jsm/"):]
    return "three/" + rel


def bare_sources(package: Path, files: list[str]) -> dict[str, str]:
    """Module sources keyed by bare specifier, their relative imports rewritten to bare specifiers.

    Pages opened from ``file://`` cannot load module files, so the viewer then imports these sources as
    blob URLs through an import map, where relative specifiers would not resolve.
    """
    out = {}
    for rel in files:
        base = Path(rel).parent

        def bare(m: re.Match, base: Path = base) -> str:
            spec = m.group(3)
            if not spec.startswith(("./", "../")):
                return m.group(0)
            target = os.path.normpath(base / spec).replace(os.sep, "/")
            return f"{m.group(1)}{m.group(2)}{import_specifier(target)}{m.group(2)}"

        out[import_specifier(rel)] = _SPECIFIER.sub(bare, (package / rel).read_text(encoding="utf-8"))
    return out
