"""idto3d: expressive ID-guided 3D heads via score distillation sampling."""

__version__ = "0.1.0"
