"""Private machinery of :mod:`datamodules.minilandmarks_build` (sources, geometry, labels, planning, pixels)."""
