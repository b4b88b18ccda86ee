"""The 2D priors: ID- and expression-aware Stable Diffusion for normals and albedo (``prior``, ``adapters``,
``prior_runtime``), SDS guidance (``guidance``) and the oracles that stand in for a prior with exact scores of a
known target (``mesh_oracle``, ``texture_oracle``). Fine-tuning lives one layer up, in ``priors.training``."""
