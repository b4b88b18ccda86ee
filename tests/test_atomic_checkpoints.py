"""Checkpoints are written atomically: a writer interrupted (an exception, or the process killed) half way through
never leaves a half file at the checkpoint's path, so a resume reads the previous good checkpoint (or none).

The writers are made to die mid-write by replacing the serialiser they end up calling (``torch.save``,
safetensors' ``save_file``) with one that writes the first half of the real bytes to wherever it was asked to
write and then raises (or SIGKILLs its own process). Whatever the implementation writes to first (a buffer, a
temp file), the checkpoint's final path must still hold the previous file, and no temp file may be left after an
exception.
"""

from __future__ import annotations

from types import SimpleNamespace

import io
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import idto3d
from idto3d.core.atomic import atomic_torch_save, atomic_write
from idto3d.core.config import load_config
from idto3d.geometry.expression_field import build_field

from cpu_threads import one_thread
from geometry_stage_driver import oracle_guidance, run_geometry, sphere_field, stage_config

REAL_TORCH_SAVE = torch.save


class KilledMidWrite(RuntimeError):
    """Stands for the process dying while the file is being written."""


def _write_half(data: bytes, f) -> None:  # noqa: ANN001
    half = data[: len(data) // 2]
    if isinstance(f, (str, os.PathLike)):
        with open(f, "wb") as fh:
            fh.write(half)
    else:
        f.write(half)
        if hasattr(f, "flush"):
            f.flush()


def torch_save_dying_half_way(obj, f, *args, **kwargs):  # noqa: ANN001
    buf = io.BytesIO()
    REAL_TORCH_SAVE(obj, buf, *args, **kwargs)
    _write_half(buf.getvalue(), f)
    raise KilledMidWrite(f"killed half way through torch.save to {f!r}")


def _leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---- core.atomic ------------------------------------------------------------------------------------------

def test_atomic_torch_save_interrupted_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(path, {"iteration": 2, "w": torch.arange(5000.0)})
    good = path.read_bytes()
    monkeypatch.setattr(torch, "save", torch_save_dying_half_way)
    with pytest.raises(KilledMidWrite):
        atomic_torch_save(path, {"iteration": 4, "w": torch.zeros(5000)})
    monkeypatch.undo()
    assert path.read_bytes() == good, "an interrupted atomic_torch_save changed the file at its final path"
    assert torch.load(path, weights_only=True)["iteration"] == 2
    assert _leftovers(tmp_path, {"ckpt.pt"}) == [], "temp files left behind"
    # And with no previous file there is still none (not a half one).
    monkeypatch.setattr(torch, "save", torch_save_dying_half_way)
    with pytest.raises(KilledMidWrite):
        atomic_torch_save(tmp_path / "new.pt", {"iteration": 1})
    assert not (tmp_path / "new.pt").exists(), "an interrupted first save left a half file"
    assert _leftovers(tmp_path, {"ckpt.pt"}) == [], "temp files left behind"


def test_atomic_write_interrupted_half_way_keeps_the_previous_file(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write(path, lambda p: p.write_bytes(b"good" * 1000))

    def dies(p: Path) -> None:
        _write_half(b"new!" * 1000, p)
        raise KilledMidWrite("killed")

    with pytest.raises(KilledMidWrite):
        atomic_write(path, dies)
    assert path.read_bytes() == b"good" * 1000
    assert _leftovers(tmp_path, {"state.bin"}) == [], "temp files left behind"


_KILL_SCRIPT = textwrap.dedent("""
    import io, os, signal, sys
    import torch
    from idto3d.core.atomic import atomic_torch_save

    real = torch.save

    def die_half_way(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with open(f, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            f.write(data)
            if hasattr(f, "flush"):
                f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = die_half_way
    atomic_torch_save(sys.argv[1], {"iteration": 4, "w": torch.zeros(20000)})
    print("not killed")
""")


def test_a_process_killed_mid_checkpoint_leaves_the_previous_checkpoint_for_the_resume(tmp_path):
    path = tmp_path / "ckpt.pt"
    atomic_torch_save(path, {"iteration": 2, "w": torch.arange(20000.0)})
    good = path.read_bytes()
    env = dict(os.environ)
    # The child imports the same idto3d as this process (a copy on PYTHONPATH included).
    env["PYTHONPATH"] = os.pathsep.join([str(Path(idto3d.__file__).resolve().parents[1]),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert path.read_bytes() == good, "a checkpoint write killed half way left a half file at the final path"
    state = torch.load(path, weights_only=True)
    assert state["iteration"] == 2 and torch.equal(state["w"], torch.arange(20000.0))


# ---- the stages' checkpoints -----------------------------------------------------------------------------

def _small_field():
    cfg = load_config("preview", None, ["geometry.grid_resolution=8", "expressions=[neutral]"])
    return build_field(cfg.geometry, n_expressions=1, seed=0)


def test_an_interrupted_stage_checkpoint_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    from idto3d.stages.stage_state import StageCounters, StageState

    folder = tmp_path / "geometry"
    folder.mkdir()
    ckpt, log = folder / "ckpt.pt", folder / "log.jsonl"
    field = _small_field()
    opt = torch.optim.Adam(field.parameters(), lr=1e-2)
    state = StageState(field, opt, torch.Generator().manual_seed(0), {}, "key")
    field.codes.sum().backward()
    opt.step()
    state.save(ckpt, StageCounters(iteration=2))
    good = ckpt.read_bytes()
    codes_at_2 = field.codes.detach().clone()
    with torch.no_grad():
        field.codes.add_(1.0)

    monkeypatch.setattr(torch, "save", torch_save_dying_half_way)
    with pytest.raises(KilledMidWrite):
        state.save(ckpt, StageCounters(iteration=4))
    monkeypatch.undo()
    assert ckpt.read_bytes() == good, "an interrupted stage checkpoint changed ckpt.pt: it is not written atomically"
    assert _leftovers(folder, {"ckpt.pt"}) == [], "temp files left behind"
    # The resume reads the previous checkpoint.
    fresh = _small_field()
    resumed = StageState(fresh, torch.optim.Adam(fresh.parameters(), lr=1e-2), torch.Generator(), {}, "key")
    counters = resumed.begin(ckpt, log, "refused", seed=0)
    assert counters.iteration == 2
    assert torch.equal(fresh.codes.detach(), codes_at_2)


def test_the_geometry_stage_killed_at_a_checkpoint_resumes_from_the_previous_one(tmp_path, monkeypatch):
    with one_thread():
        cfg = stage_config(["geometry.iterations=4", "geometry.checkpoint_every=2"])
        run = tmp_path / "run"
        first = run_geometry(run, cfg, oracle_guidance(cfg), sphere_field(cfg), stop_after=2)
        assert first.iterations == 2
        ckpt = run / "geometry" / "ckpt.pt"
        good = ckpt.read_bytes()
        before = set(p.name for p in (run / "geometry").iterdir())

        monkeypatch.setattr(torch, "save", torch_save_dying_half_way)
        with pytest.raises(KilledMidWrite):
            run_geometry(run, cfg, oracle_guidance(cfg), sphere_field(cfg))
        monkeypatch.undo()
        assert ckpt.read_bytes() == good, "the geometry stage's checkpoint is not written atomically"
        assert torch.load(ckpt, weights_only=True)["iteration"] == 2
        assert not [p for p in run.rglob("*") if ".tmp" in p.name], "temp files left behind"
        assert not (run / "geometry" / "done.json").exists()
        assert set(p.name for p in (run / "geometry").iterdir()) <= before | {"progress.png"}

        again = run_geometry(run, cfg, oracle_guidance(cfg), sphere_field(cfg))
        assert (again.resumed_from, again.iterations) == (2, 4)


# ---- prior training checkpoints --------------------------------------------------------------------------

def test_an_interrupted_adapter_checkpoint_keeps_the_previous_weights(tmp_path, monkeypatch):
    import safetensors.torch as st

    from idto3d.priors.training.train_state import save_trainable

    class FakePrior:
        spec = SimpleNamespace(unet_weights=None)  # adapters only: no trained base UNet

        def __init__(self, value: float) -> None:
            self.value = value

        def adapter_state_dict(self) -> dict[str, torch.Tensor]:
            return {"a.weight": torch.full((64, 64), self.value), "b.weight": torch.full((32,), self.value)}

    path = tmp_path / "trainable.safetensors"
    save_trainable(FakePrior(1.0), path)
    good = path.read_bytes()
    real = st.save

    def dying_save_file(tensors, filename, metadata=None):  # noqa: ANN001
        _write_half(real(tensors, metadata=metadata), filename)
        raise KilledMidWrite("killed half way through save_file")

    monkeypatch.setattr(st, "save_file", dying_save_file)
    with pytest.raises(KilledMidWrite):
        save_trainable(FakePrior(2.0), path)
    monkeypatch.undo()
    assert path.read_bytes() == good, "an interrupted save_trainable changed the checkpoint at its final path"
    assert torch.equal(st.load_file(path)["a.weight"], torch.full((64, 64), 1.0))
    assert _leftovers(tmp_path, {"trainable.safetensors"}) == [], "temp files left behind"
