"""A run folder made by the code from before the re-arrangement into layers resumes with today's code, and ends
bit for bit where an uninterrupted run of today's code ends.

``tests/data/old_run/`` was written by ``tests/tools/make_old_run.py`` run against the old code (see its docstring
for how to make it again): ``idto3d generate`` from an identity file with tiny priors, stopped after the geometry
stage finished and 2 of the texture stage's 4 iterations. The priors are rebuilt here from the same seeds, with the
tokenizer the old run's tiny base had (``tests/data/old_run_tokenizer/``: its training differs between processes).
Nothing on disk was renamed by the re-arrangement, so today's code must reuse the folder's config, identity,
initial field, finished geometry stage and UV atlas, and resume the texture stage from the old checkpoint.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from idto3d.core.config import AdapterConfig, dump_config, load_config
from idto3d.core.run_layout import RunLayout
from idto3d.geometry.mesh_io import load_mesh
from idto3d.stages.generate import generate

from priors_fixtures import isolated_cache  # noqa: F401  (fixture: the expression cache per test)

sys.path.insert(0, str(Path(__file__).parent / "tools"))
import make_old_run as old  # noqa: E402  (the settings the folder was made with)

DATA = Path(__file__).parent / "data"
OLD_RUN = DATA / old.RUN


@pytest.fixture(scope="module")
def priors(tmp_path_factory) -> Path:
    """The priors the old run used, rebuilt from the same seeds with today's code and the old run's tokenizer."""
    from idto3d.priors.prior import build_prior, save_prior
    from idto3d.priors.tiny import make_tiny_base_model

    root = tmp_path_factory.mktemp("priors")
    base = make_tiny_base_model(root / "sd", seed=old.TINY_BASE_SEED)
    vocab = json.loads((DATA / old.TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    assert json.loads((base / "text_encoder" / "config.json").read_text())["vocab_size"] == len(vocab)
    for name in old.TOKENIZER_FILES:
        shutil.copyfile(DATA / old.TOKENIZER / name, base / "tokenizer" / name)
    adapter = AdapterConfig(self_attn_rank=old.ADAPTER_RANK, cross_attn_rank=old.ADAPTER_RANK)
    for domain in ("normal", "albedo"):
        save_prior(build_prior(base, domain, old.ID_DIM, adapter, seed=old.PRIOR_SEED), root / domain)
    return root


def _files(run: Path) -> dict[str, bytes]:
    """The run's outputs. Left out: the folder's own records (``.idto3d/``: manifest, lock) and the checkpoint
    kept before the last (``ckpt.prev.pt``), which versions before run keys did not keep."""
    return {RunLayout(run).relative(p): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and ".idto3d" not in p.parts and p.name != "ckpt.prev.pt"}


def _plain(x: object) -> object:
    """``x`` with every tensor as (dtype, shape, bytes), so ``==`` compares bit for bit."""
    if isinstance(x, torch.Tensor):
        return str(x.dtype), tuple(x.shape), x.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _untimed(rel: str, data: bytes) -> object:
    """A file's contents to compare across runs: JSON records and checkpoints without their wall time
    (``seconds``), archives by their arrays."""
    if rel.endswith(".pt"):
        state = torch.load(io.BytesIO(data), weights_only=True)
        return _plain({k: v for k, v in state.items() if k != "seconds"})
    if rel.endswith(".json"):  # and the stage key, which markers of a version before run keys do not hold
        return {k: v for k, v in json.loads(data).items() if k not in ("seconds", "key")}
    if rel.endswith(".jsonl"):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in data.splitlines()]
    if rel.endswith(".npz"):  # the arrays: the zip container's headers differ between Python patch releases
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return {k: (str(arrays[k].dtype), arrays[k].shape, arrays[k].tobytes()) for k in arrays.files}
    if rel == "config.yaml":  # read with today's defaults: keys added since (export.morph_targets) are no change
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.yaml").write_bytes(data)
            return dump_config(load_config(None, Path(tmp) / "config.yaml"))
    return data


def test_the_checked_in_folder_is_an_old_run_stopped_in_the_texture_stage():
    layout = RunLayout(OLD_RUN)
    # Today's config of the same settings is the old config.yaml read with today's defaults for keys added since
    # (else the run would be refused).
    today = dump_config(load_config("preview", None, old.OVERRIDES))
    assert dump_config(load_config(None, layout.config)) == today
    for path in (layout.identity, layout.init_field, layout.init_report, layout.geometry_sds.done,
                 layout.geometry_sds.checkpoint, layout.atlas, layout.texture_sds.checkpoint):
        assert path.is_file(), path
    assert not layout.texture_sds.done.exists() and not layout.export.exists()
    assert torch.load(layout.texture_sds.checkpoint, weights_only=True)["iteration"] == old.STOP_AFTER - 6
    assert sum(len(b) for b in _files(OLD_RUN).values()) < 320_000  # small enough to live in the repository


@pytest.mark.slow
def test_an_old_run_folder_resumes_on_a_machine_with_other_vector_units(tmp_path, priors):
    """On a CPU with other vector units (torch's AVX2 kernels against its plain ones, say) the finished field gives
    meshes that differ in their last bits, and the texture checkpoint is tied to the meshes' bits. Simulated: the field's every weight one ulp
    up, so extracting gives other bits. The folder still resumes, on the meshes the geometry stage saved."""
    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run)
    ckpt = RunLayout(run).geometry_sds.checkpoint
    state = torch.load(ckpt, weights_only=True)
    state["field"] = {k: torch.nextafter(v, torch.full_like(v, np.inf)) if v.is_floating_point() else v
                      for k, v in state["field"].items()}
    torch.save(state, ckpt)
    cfg = load_config("preview", None, old.OVERRIDES)
    before = _files(run)
    resumed = generate([run / "identity.safetensors"], run, cfg, normal_prior=str(priors / "normal"),
                       albedo_prior=str(priors / "albedo"), progress=False)
    assert (resumed.geometry.resumed_from, resumed.texture.resumed_from) == (6, old.STOP_AFTER - 6)
    assert resumed.texture.iterations == 4 and resumed.exported
    layout = RunLayout(run)
    for name in cfg.expressions:
        saved = tmp_path / f"{name}.ply"
        saved.write_bytes(before[layout.relative(layout.stage_mesh(name, ".ply"))])
        assert torch.equal(resumed.geometry.meshes[name].vertices, load_mesh(saved, merge=False).vertices)


MADE_ON = json.loads((DATA / old.MACHINE).read_text(encoding="utf-8"))["cpu_capability"]
HERE = torch.backends.cpu.get_cpu_capability()


@pytest.mark.slow
@pytest.mark.skipif(MADE_ON != HERE, reason=f"the old run was made on a {MADE_ON} CPU, this one is {HERE}: floats "
                                            f"differ in their last bits")
def test_an_old_run_folder_resumes_to_the_uninterrupted_result(tmp_path, priors):
    cfg = load_config("preview", None, old.OVERRIDES)
    kw = dict(normal_prior=str(priors / "normal"), albedo_prior=str(priors / "albedo"), progress=False)
    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run)
    before = _files(run)
    resumed = generate([run / "identity.safetensors"], run, cfg, **kw)
    assert resumed.missing is not None and "photos are not at hand" in resumed.missing
    assert (resumed.geometry.resumed_from, resumed.texture.resumed_from) == (6, old.STOP_AFTER - 6)
    assert resumed.texture.iterations == 4 and resumed.exported
    # The old files were reused as they are: none was rewritten but the resumed stage's checkpoint and its log
    # (appended to).
    after = _files(run)
    layout = RunLayout(run)
    kept = set(before) - {layout.relative(p) for p in (layout.texture_sds.checkpoint, layout.texture_sds.log)}
    assert {rel: after[rel] for rel in kept} == {rel: before[rel] for rel in kept}

    ident = tmp_path / "id.safetensors"
    shutil.copyfile(OLD_RUN / "identity.safetensors", ident)
    # The uninterrupted run, on the old folder's UV atlas: a resumed folder keeps its atlas, while a fresh run today
    # lays its charts out anew (issue 19's few-chart layout), so only with the same atlas are the textures comparable.
    generate([ident], tmp_path / "full", cfg, stop_after=6, **kw)
    shutil.copyfile(OLD_RUN / layout.relative(layout.atlas), RunLayout(tmp_path / "full").atlas)
    full = generate([ident], tmp_path / "full", cfg, **kw)
    for name in cfg.expressions:
        assert torch.equal(resumed.geometry.meshes[name].vertices, full.geometry.meshes[name].vertices), name
    for (key, a), b in zip(full.texture.field.state_dict().items(), resumed.texture.field.state_dict().values()):
        assert torch.equal(a, b), key
    # Every file of the uninterrupted run is in the resumed folder with the same contents (wall times aside), but
    # the two previews left out of the checked-in folder.
    expected = _files(tmp_path / "full")
    assert set(expected) - set(after) == set(old.PREVIEWS) and set(after) <= set(expected)
    for rel in set(after):
        assert _untimed(rel, after[rel]) == _untimed(rel, expected[rel]), rel
