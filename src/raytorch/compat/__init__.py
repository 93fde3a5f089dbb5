"""Compat: what raytorch relies on in Ray beyond its public API, in one place. Every private Ray
module or attribute it reaches and every match on the text of Ray's messages live in
`rayprivate.py`, each checked by tests/test_compat.py against the installed Ray, so an upgrade that
moves one fails there, loudly, not in the middle of a run.

Imports: Ray, `raytorch.errors`; nothing else of raytorch's."""
