"""``python -m raytrain``: the same as the ``raytrain`` command."""

from raytrain.cli import cli

cli()
