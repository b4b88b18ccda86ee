"""Reading, checking and writing triangle meshes.

Every problem a user's file can have becomes a :class:`~idto3d.core.errors.MeshError` that says what
is wrong and what to do, never a parser traceback. Fixable problems are fixed with a warning
instead: several meshes in one file are concatenated, and an inside-out (or inconsistently
wound) closed mesh is re-oriented so its faces point outward.
"""

from __future__ import annotations

import warnings
from collections import deque
from pathlib import Path

import numpy as np
import torch

from idto3d.core.atomic import atomic_write
from idto3d.core.errors import MeshError
from idto3d.render.mesh import Mesh

__all__ = ["MeshWarning", "load_mesh", "save_mesh", "validate_mesh", "mesh_stats"]

# What trimesh can read as triangle meshes (it also reads point clouds and 2D paths, which we refuse).
LOADABLE = (".obj", ".ply", ".stl", ".off", ".glb", ".gltf")
SAVEABLE = (".obj", ".ply")


class MeshWarning(UserWarning):
    """A mesh was usable after an automatic fix (merged scene, flipped faces)."""


# --- loading --------------------------------------------------------------------------------------


def load_mesh(path: str | Path, merge: bool = True) -> Mesh:
    """Read a triangle mesh (OBJ, PLY, STL, OFF, GLB/GLTF) into a float32/int64 :class:`Mesh`.

    Vertices split only by UVs or normals are merged so a closed surface reads as closed (``merge=False``: read
    the vertices and faces as stored, e.g. a mesh this program saved, to get it back bit for bit). A file
    holding several meshes is concatenated (with a :class:`MeshWarning`). Raises ``MeshError``
    for a missing, unreadable, corrupt or empty file and for NaN/inf coordinates; it does not
    check topology, see :func:`validate_mesh`.
    """
    import trimesh

    path = Path(path)
    if not path.exists():
        raise MeshError(f"mesh file not found: {path}; check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        raise MeshError(f"{path} is a folder, not a mesh file; pass the mesh file itself")
    suffix = path.suffix.lower()
    if suffix not in LOADABLE:
        raise MeshError(
            f"cannot read {path}: unsupported mesh format {suffix or '(no extension)'!r}; "
            f"use one of {', '.join(LOADABLE)} (convert it e.g. with MeshLab or Blender)"
        )
    if path.stat().st_size == 0:
        raise MeshError(f"{path} is an empty file (0 bytes); re-export the mesh")
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as exc:  # noqa: BLE001 - every parser failure means the same thing to a user
        raise MeshError(
            f"could not read {path}: the file is corrupt, truncated or not a valid {suffix[1:].upper()} "
            f"file ({_short_reason(exc)}); re-export it from your 3D tool"
        ) from None

    tm = _as_single_trimesh(loaded, path)
    vertices = np.asarray(tm.vertices, dtype=np.float64)
    faces = np.asarray(tm.faces, dtype=np.int64)
    if vertices.shape[0] == 0 or faces.shape[0] == 0:
        raise MeshError(
            f"{path} holds an empty mesh ({vertices.shape[0]} vertices, {faces.shape[0]} faces); "
            "it must contain triangles, not only points"
        )
    bad = ~np.isfinite(vertices).all(axis=1)
    if bad.any():
        raise MeshError(
            f"{path} has {int(bad.sum())} vertices with NaN or infinite coordinates; "
            "fix or re-export the mesh"
        )
    # Merge after the NaN check (merging would silently drop them) and only on positions: OBJ/GLB
    # vertices split at UV seams or normal creases would otherwise look like holes.
    tm = trimesh.Trimesh(vertices, faces, process=False)
    if merge:
        tm.merge_vertices(merge_tex=True, merge_norm=True)
    return Mesh(
        torch.from_numpy(np.asarray(tm.vertices, dtype=np.float32).copy()),
        torch.from_numpy(np.asarray(tm.faces, dtype=np.int64).copy()),
    )


def _short_reason(exc: Exception) -> str:
    # trimesh falls back to charset detection on undecodable text and then fails on a missing
    # optional module: that says nothing useful to a user.
    if isinstance(exc, (ModuleNotFoundError, UnicodeDecodeError)):
        return "it contains bytes that are not text"
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg[:200]


def _as_single_trimesh(loaded: object, path: Path):  # -> trimesh.Trimesh
    import trimesh

    if isinstance(loaded, trimesh.Scene):
        meshes = [g for g in loaded.dump(concatenate=False) if isinstance(g, trimesh.Trimesh)]
        meshes = [m for m in meshes if len(m.faces) > 0]
        if not meshes:
            raise MeshError(
                f"{path} contains no triangle mesh: the file is empty, corrupt, or holds only points, "
                "lines or cameras; export the head as a triangle mesh"
            )
        if len(meshes) > 1:
            warnings.warn(
                f"{path} contains {len(meshes)} meshes; they were concatenated into one. If only one "
                "of them is the head, export it alone.",
                MeshWarning,
                stacklevel=3,
            )
        return trimesh.util.concatenate(meshes) if len(meshes) > 1 else meshes[0]
    if isinstance(loaded, trimesh.Trimesh):
        return loaded
    kind = type(loaded).__name__
    raise MeshError(
        f"{path} holds a {kind}, not a triangle mesh (0 faces); export the head as a triangle mesh"
    )


# --- validation -----------------------------------------------------------------------------------


def _edge_counts(faces: np.ndarray, n_vertices: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Undirected edge keys, how many faces use each, and directed-edge keys ``a*V+b`` per face edge."""
    a = faces.reshape(-1)
    b = np.roll(faces, -1, axis=1).reshape(-1)
    directed = a * n_vertices + b
    undirected = np.minimum(a, b) * n_vertices + np.maximum(a, b)
    keys, counts = np.unique(undirected, return_counts=True)
    return keys, counts, directed


def mesh_stats(mesh: Mesh) -> dict[str, float | int | bool]:
    """Topology numbers used by the checks and handy in reports."""
    v = mesh.vertices.detach().cpu().double().numpy()
    f = mesh.faces.detach().cpu().numpy().astype(np.int64)
    _, counts, _ = _edge_counts(f, v.shape[0])
    return {
        "vertices": int(v.shape[0]),
        "faces": int(f.shape[0]),
        "boundary_edges": int((counts == 1).sum()),
        "nonmanifold_edges": int((counts > 2).sum()),
        "watertight": bool(counts.size > 0 and (counts == 2).all()),
        "signed_volume": _signed_volume(v, f),
    }


def _signed_volume(v: np.ndarray, f: np.ndarray) -> float:
    # Divergence theorem: sum of signed tetra volumes against the centroid (centroid, not origin,
    # so float cancellation stays small for meshes far from the origin).
    c = v.mean(0)
    a, b, d = v[f[:, 0]] - c, v[f[:, 1]] - c, v[f[:, 2]] - c
    return float(np.einsum("ij,ij->i", a, np.cross(b, d)).sum() / 6.0)


def _orient_consistently(f: np.ndarray, n_vertices: int) -> tuple[np.ndarray, int]:
    """Flip faces so neighbours agree (each shared edge used in opposite directions).

    Breadth-first over the face adjacency of a manifold mesh: a neighbour that walks the shared
    edge in the same direction as the current face is wound the other way, so flip it. Returns the
    faces and how many were flipped. Raises when the surface is non-orientable (a Moebius-like
    strip), which no flipping can fix.
    """
    n_f = f.shape[0]
    a = f.reshape(-1)
    b = np.roll(f, -1, axis=1).reshape(-1)
    und = np.minimum(a, b) * n_vertices + np.maximum(a, b)
    order = np.argsort(und, kind="stable")
    und_sorted = und[order]
    # Manifold: every edge key appears at most twice, so pairs are adjacent after sorting.
    pair = np.nonzero(und_sorted[1:] == und_sorted[:-1])[0]
    h0, h1 = order[pair], order[pair + 1]  # half-edges (face*3 + corner) sharing an edge
    same_dir = a[h0] == a[h1]  # same start vertex -> same direction -> windings disagree
    f0, f1 = h0 // 3, h1 // 3
    nbr: list[list[tuple[int, bool]]] = [[] for _ in range(n_f)]
    for x, y, s in zip(f0.tolist(), f1.tolist(), same_dir.tolist()):
        nbr[x].append((y, s))
        nbr[y].append((x, s))
    flip = np.zeros(n_f, dtype=bool)
    seen = np.zeros(n_f, dtype=bool)
    for start in range(n_f):
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        while queue:
            i = queue.popleft()
            for j, s in nbr[i]:
                want = flip[i] ^ s
                if not seen[j]:
                    seen[j] = True
                    flip[j] = want
                    queue.append(j)
                elif flip[j] != want:
                    raise MeshError(
                        "the mesh is not orientable (no consistent inside/outside, like a Moebius "
                        "strip); it cannot be used as a closed template"
                    )
    out = f.copy()
    out[flip] = out[flip][:, [0, 2, 1]]
    return out, int(flip.sum())


def validate_mesh(mesh: Mesh, require_watertight: bool = True, name: str = "mesh") -> Mesh:
    """Check that ``mesh`` is a usable surface; fix its orientation if that is all that is wrong.

    Raises ``MeshError`` (mentioning ``name``) for: no vertices or faces, face indices out of
    range, NaN/inf vertices, only degenerate (zero-area) faces, non-manifold edges (used by more
    than two faces) and, when ``require_watertight``, open boundary edges. A closed mesh whose
    faces are inconsistently wound or point inward is re-oriented with a :class:`MeshWarning`;
    the fix is applied to ``mesh`` itself (its ``faces`` attribute is replaced, the old tensor is
    untouched) and the mesh is also returned, so ``validate_mesh(m)`` and
    ``m = validate_mesh(m)`` both work.
    """
    n_v = int(mesh.vertices.shape[0])
    n_f = int(mesh.faces.shape[0]) if mesh.faces.dim() == 2 else 0
    if n_v == 0 or n_f == 0:
        raise MeshError(f"{name} is empty ({n_v} vertices, {n_f} faces); it must contain triangles")
    if mesh.vertices.dim() != 2 or mesh.vertices.shape[1] != 3 or mesh.faces.shape[1] != 3:
        raise MeshError(
            f"{name} must have vertices [V, 3] and triangle faces [F, 3], got "
            f"{tuple(mesh.vertices.shape)} and {tuple(mesh.faces.shape)}"
        )
    v = mesh.vertices.detach().cpu().double().numpy()
    f = mesh.faces.detach().cpu().numpy().astype(np.int64)
    if f.min() < 0 or f.max() >= n_v:
        raise MeshError(
            f"{name} has face indices outside [0, {n_v - 1}] (min {f.min()}, max {f.max()}); the file is corrupt"
        )
    bad = ~np.isfinite(v).all(axis=1)
    if bad.any():
        raise MeshError(f"{name} has {int(bad.sum())} vertices with NaN or infinite coordinates; fix the mesh")
    area2 = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    scale = float(np.abs(v).max()) or 1.0
    degenerate = area2 <= 1e-12 * scale * scale
    if degenerate.all():
        raise MeshError(
            f"all {n_f} faces of {name} are degenerate (zero area: repeated or collinear vertices); "
            "the mesh has no surface"
        )
    _, counts, directed = _edge_counts(f, n_v)
    n_nonmanifold = int((counts > 2).sum())
    if n_nonmanifold:
        raise MeshError(
            f"{name} is not a manifold: {n_nonmanifold} edges are shared by more than two faces "
            "(e.g. touching or duplicated parts); repair it, e.g. MeshLab 'Repair non Manifold "
            "Edges' or Blender 'Merge by Distance' + 'Select Non-Manifold'"
        )
    n_boundary = int((counts == 1).sum())
    if require_watertight and n_boundary:
        raise MeshError(
            f"{name} is not watertight: {n_boundary} boundary edges border holes (an SDF needs a "
            "closed surface, e.g. the neck must be capped); fill the holes, e.g. with MeshLab "
            "'Close Holes', Blender '3D-Print Toolbox > Make Manifold' or trimesh.repair.fill_holes"
        )
    if n_boundary:
        return mesh  # an open surface has no inside; orientation is the user's business

    fixed = f
    notes = []
    # Closed manifold: consistent winding means every directed edge occurs exactly once.
    if np.unique(directed).size != directed.size:
        fixed, n_flipped = _orient_consistently(f, n_v)
        notes.append(f"{n_flipped} inconsistently wound faces were flipped")
    if _signed_volume(v, fixed) < 0:
        fixed = fixed[:, [0, 2, 1]]
        notes.append("the mesh was inside-out (negative volume), so all faces were flipped to point outward")
    if notes:
        warnings.warn(f"{name}: " + "; ".join(notes), MeshWarning, stacklevel=2)
        mesh.faces = torch.from_numpy(np.ascontiguousarray(fixed)).to(mesh.faces.device)
    return mesh


# --- saving ---------------------------------------------------------------------------------------


def save_mesh(mesh: Mesh, path: str | Path) -> Path:
    """Write ``mesh`` as OBJ or PLY (chosen by extension) atomically: a crash never leaves half a file."""
    import trimesh

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SAVEABLE:
        raise MeshError(f"cannot write {path}: use a .obj or .ply file name (got {suffix or 'no extension'!r})")
    v = mesh.vertices.detach().cpu().double().numpy()
    f = mesh.faces.detach().cpu().numpy().astype(np.int64)
    tm = trimesh.Trimesh(v, f, process=False)
    if suffix == ".obj":
        from trimesh.exchange.obj import export_obj

        # Full float precision so a save/load round trip is lossless to float32.
        text = export_obj(tm, include_normals=False, include_color=False, include_texture=False,
                          digits=9, header=None)
        return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))
    data = tm.export(file_type="ply", encoding="binary")
    return atomic_write(path, lambda p: p.write_bytes(data))


def weld_degenerate(mesh: Mesh, tolerance: float = 1e-7, min_area: float = 1e-12) -> Mesh:
    """``mesh`` with coincident vertices merged and the zero-area faces that leaves dropped.

    Marching tets puts a vertex on every crossed edge, so where the SDF is (almost) zero at a grid vertex several
    edges give the same point and the faces between them collapse. Merging those points first keeps the surface
    closed; dropping the collapsed faces then only removes faces with no area (UV unwrapping refuses them).
    """
    v = mesh.vertices.detach().cpu().double().numpy()
    f = mesh.faces.detach().cpu().numpy()
    key = np.round(v / tolerance).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    f = inverse.reshape(-1)[f]
    v = v[first]
    a, b, c = (v[f[:, i]] for i in range(3))
    area = 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)
    f = f[area > min_area]
    used = np.zeros(v.shape[0], dtype=bool)
    used[f.ravel()] = True
    remap = np.cumsum(used) - 1
    return Mesh(torch.from_numpy(v[used]).to(mesh.vertices), torch.from_numpy(remap[f]).to(mesh.faces))
