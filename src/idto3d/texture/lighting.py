"""The texture stage's lighting: a random environment map per iteration, rotated about +Y (paper section 3.4).

Maps from a user folder are read once, when the stage starts, so a corrupt file fails before any compute is
spent (not at a random iteration hours later), and they are kept small (``height x 2*height``) so 60 maps cost
a few MB. Each draw rotates by a whole number of columns: the rotation is then an exact roll, and the
prefiltered lighting of the base map is reused (``render.pbr.prefilter_envmap`` caches per base map).

Procedural skies come from a pool of ``PROCEDURAL_POOL`` maps, each drawn once from the run's seed when first
used: the offline stand-in for the paper's list of 60 HDR maps, and it keeps the prefilter cache useful
(a fresh sky every iteration would cost ~0.1 s of generation and prefiltering each).
"""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from idto3d.core.config import TextureConfig
from idto3d.core.progress import progress_bar
from idto3d.render.envmap import EnvironmentMap, load_envmap, load_envmap_folder, procedural_envmap, rotate_y


PROCEDURAL_POOL = 32


class LightingSampler:
    """``sample(generator) -> EnvironmentMap``; with ``random_lighting`` off, always the same unrotated map."""

    def __init__(self, cfg: TextureConfig, seed: int = 0, console: Console | None = None,
                 progress: bool = True, device: torch.device | str = "cpu") -> None:
        self.cfg = cfg
        self.seed = seed
        # Maps live on the render device from the start: the prefilter cache is keyed by map object, so moving
        # a map every step would prefilter it again every step.
        self.device = torch.device(device)
        self.maps: list[EnvironmentMap] = []
        self._pool: dict[int, EnvironmentMap] = {}
        if cfg.envmaps:
            files = load_envmap_folder(cfg.envmaps)  # EnvMapError: missing, unreadable or empty folder
            with progress_bar("environment maps", len(files), console, enabled=progress) as update:
                for f in files:
                    self.maps.append(load_envmap(f, cfg.envmap_height).to(self.device))  # EnvMapError names a corrupt file
                    update()
        # The fixed environment of the ablation: the first file, else a procedural sky drawn from the seed.
        self.fixed = self.maps[0] if self.maps else self.procedural(0)

    def procedural(self, index: int) -> EnvironmentMap:
        """Procedural sky ``index`` of the pool (the same map for the same seed and index)."""
        if index not in self._pool:
            gen = torch.Generator().manual_seed(self.seed * 7919 + index)
            self._pool[index] = procedural_envmap(gen, self.cfg.envmap_height).to(self.device)
        return self._pool[index]

    @property
    def source(self) -> str:
        kind = f"{len(self.maps)} maps from {Path(self.cfg.envmaps)}" if self.maps else "procedural skies"
        return kind if self.cfg.random_lighting else f"one fixed map ({self.fixed.name or 'procedural'})"

    def sample(self, generator: torch.Generator) -> EnvironmentMap:
        if not self.cfg.random_lighting:
            return self.fixed
        use_procedural = not self.maps or (
            float(torch.rand((), generator=generator, dtype=torch.float64)) < self.cfg.procedural_fraction)
        if use_procedural:
            env = self.procedural(int(torch.randint(0, PROCEDURAL_POOL, (), generator=generator)))
        else:
            env = self.maps[int(torch.randint(0, len(self.maps), (), generator=generator))]
        column = int(torch.randint(0, env.width, (), generator=generator))
        return rotate_y(env, column * 360.0 / env.width)
