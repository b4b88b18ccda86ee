"""Claims about the fine-tuning data set: what an item holds, domain filtering, and clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from idto3d.priors.training.dataset import PriorDataError, PriorDataset, load_image

PROMPT = "A {} view {} face portrait of a young Caucasian female on a white background"


def write_data(root: Path, id_dim: int = 128, size: int = 32, with_ids: bool = True) -> Path:
    """2 subjects x 2 views x 2 domains of smooth images; subject 001 has no identity file."""
    rng = np.random.default_rng(0)
    records = []
    (root / "identities").mkdir(parents=True, exist_ok=True)
    if with_ids:
        save_file({"embedding": torch.nn.functional.normalize(torch.randn(id_dim), dim=0)},
                  root / "identities" / "000.safetensors")
    for s, expr in (("000", "smile"), ("001", "neutral")):
        for k in range(2):
            for domain, word in (("normal", "normal map"), ("albedo", "albedo")):
                rel = f"{domain}/{s}_000_{k:03d}.png"
                (root / domain).mkdir(exist_ok=True)
                y, x = np.mgrid[0:size, 0:size] / size
                img = np.stack([x, y, np.full_like(x, rng.random())], -1)
                Image.fromarray((img * 255).astype(np.uint8)).save(root / rel)
                records.append({"image": rel, "domain": domain, "prompt": PROMPT.format("front", word),
                                "subject": s, "expression": expr, "camera": {},
                                "id_embedding": f"identities/{s}.safetensors" if with_ids and s == "000" else None})
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def _rewrite(root: Path, edit) -> None:
    records = [json.loads(line) for line in (root / "index.jsonl").read_text().splitlines()]
    edit(records)
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_items_hold_image_prompt_identity_and_expression(tmp_path):
    root = write_data(tmp_path / "d")
    ds = PriorDataset(root, "normal", 16)
    assert len(ds) == 4 and ds.id_dim == 128
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
    # Resized from the 32x32 file: the x-ramp in red survives.
    assert float(item["image"][0, :, -1].mean()) > float(item["image"][0, :, 0].mean()) + 0.5
    assert item["prompt"] == PROMPT.format("front", "normal map")
    assert item["expression"] == "smile" and bool(item["has_id"])
    from safetensors.torch import load_file
    assert torch.equal(item["id_embedding"], load_file(root / "identities" / "000.safetensors")["embedding"])
    # A subject without identity: zeros and the flag off.
    other = next(ds[i] for i in range(len(ds)) if ds.records[i].subject == "001")
    assert not bool(other["has_id"]) and torch.equal(other["id_embedding"], torch.zeros(128))
    assert all("albedo" not in str(r.image) for r in ds.records)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["has_id"].dtype == torch.bool
    assert len(batch["prompt"]) == 4


def test_identity_size_comes_from_the_prior_when_no_files_exist(tmp_path):
    root = write_data(tmp_path / "d", with_ids=False)
    ds = PriorDataset(root, "albedo", 16)
    assert ds.id_dim is None
    with pytest.raises(PriorDataError, match="id_dim is unknown"):
        ds[0]
    ds.use_id_dim(512)
    assert ds[0]["id_embedding"].shape == (512,)


def test_wrong_embedding_size_for_the_prior_is_refused(tmp_path):
    root = write_data(tmp_path / "d", id_dim=128)
    with pytest.raises(PriorDataError, match="128-D embedding but the prior expects 512-D"):
        PriorDataset(root, "normal", 16, id_dim=512)


def test_missing_folder_index_and_images_are_reported(tmp_path):
    with pytest.raises(PriorDataError, match="training data folder not found"):
        PriorDataset(tmp_path / "nope", "normal", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PriorDataError, match="no index.jsonl.*render-dataset"):
        PriorDataset(tmp_path / "empty", "normal", 16)
    root = write_data(tmp_path / "d")
    (root / "normal" / "001_000_001.png").unlink()
    with pytest.raises(PriorDataError, match=r"line \d+: image .*001_000_001.png does not exist"):
        PriorDataset(root, "normal", 16)
    PriorDataset(root, "albedo", 16)  # the other domain is unaffected


def test_bad_records_name_their_line(tmp_path):
    root = write_data(tmp_path / "d")
    _rewrite(root, lambda rs: rs[2].update(expression="smirk"))
    with pytest.raises(PriorDataError, match="line 3: unknown expression 'smirk'"):
        PriorDataset(root, "normal", 16)
    root = write_data(tmp_path / "e")
    _rewrite(root, lambda rs: rs[1].update(domain="depth"))
    with pytest.raises(PriorDataError, match="unknown domain.*depth"):
        PriorDataset(root, "normal", 16)
    with pytest.raises(PriorDataError, match="unknown domain 'rgb'"):
        PriorDataset(write_data(tmp_path / "f"), "rgb", 16)
    root = write_data(tmp_path / "g")
    _rewrite(root, lambda rs: rs[0].pop("prompt"))
    with pytest.raises(PriorDataError, match="line 1: record lacks prompt"):
        PriorDataset(root, "normal", 16)
    (root / "index.jsonl").write_text('{"image": \n')
    with pytest.raises(PriorDataError, match="line 1: not valid JSON"):
        PriorDataset(root, "normal", 16)
    root = write_data(tmp_path / "h")
    _rewrite(root, lambda rs: [r.update(domain="albedo") for r in rs])
    with pytest.raises(PriorDataError, match="lists no normal images"):
        PriorDataset(root, "normal", 16)
    root = write_data(tmp_path / "i")
    (root / "identities" / "000.safetensors").write_bytes(b"junk")
    with pytest.raises(PriorDataError, match="cannot read identity file"):
        PriorDataset(root, "normal", 16)


def test_transparent_and_non_square_images_are_made_square_on_white(tmp_path):
    img = Image.new("RGBA", (40, 20), (255, 0, 0, 0))
    img.paste((0, 0, 255, 255), (10, 0, 30, 20))
    img.save(tmp_path / "a.png")
    t = load_image(tmp_path / "a.png", 20)
    assert t.shape == (3, 20, 20)
    # The centre crop keeps columns 10..30: all opaque blue.
    assert torch.allclose(t[:, 10, 10], torch.tensor([0.0, 0.0, 1.0]), atol=0.02)
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.save(tmp_path / "b.png")
    assert torch.allclose(load_image(tmp_path / "b.png", 8), torch.ones(3, 8, 8))
    (tmp_path / "c.png").write_bytes(b"not a png")
    with pytest.raises(PriorDataError, match="cannot read image"):
        load_image(tmp_path / "c.png", 8)
