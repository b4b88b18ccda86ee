"""The ``idto3d`` command line: the typer app (``cli.app``) with ``bench`` as a sub-app (``cli.bench``) and the
``batch`` command (``cli.batch``)."""

from idto3d.cli import batch as _batch  # noqa: F401  (registers ``idto3d batch`` on the app)
from idto3d.cli import bench as _bench  # noqa: F401  (registers ``idto3d bench ...`` on the app)
from idto3d.cli.app import app

__all__ = ["app"]
