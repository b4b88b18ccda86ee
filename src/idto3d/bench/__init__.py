"""Every timing harness (``idto3d bench ...``): tables by default, ratios against a baseline from the same run.

Only the CLI imports this package.
"""
