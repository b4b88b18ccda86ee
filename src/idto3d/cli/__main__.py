"""``python -m idto3d.cli`` (what ``accelerate launch -m idto3d.cli train-prior ...`` runs)."""

from idto3d.cli import app

app(prog_name="idto3d")
