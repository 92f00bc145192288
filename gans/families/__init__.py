"""Generator families: one module each, defining ``FAMILY`` (a :class:`gans.registry.Family`).

:mod:`gans.registry` finds them by listing this package; nothing registers itself on import.
"""
