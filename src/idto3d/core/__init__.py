"""The ground floor: config, errors, atomic files, device/runtime, progress, the expression vocabulary, units.

Imports nothing else of idto3d.
"""
