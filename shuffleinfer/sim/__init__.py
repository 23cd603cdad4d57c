"""The cluster simulator. Its hot modules load compiled when a build of their current
sources exists (`compiled.py`)."""

from shuffleinfer.sim.compiled import activate

activate(__path__)
