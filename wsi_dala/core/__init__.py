"""Shared ground: settings, errors, atomic writes, output paths, locks, identities, framed pictures.

May import: model.registry (settings check architecture names against that torch-free table).
"""
