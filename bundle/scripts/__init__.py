"""Thin glue for the Med-URWKV bundle (imported as ``scripts.*`` with the bundle root on ``sys.path``).

Everything reusable (network, transforms, inferer, handlers, figures) lives in the ``medurwkv`` package;
these modules only adapt it to a command line or a config entry.
"""
