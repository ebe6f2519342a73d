"""The data stage tests: a package, so that the Ray cluster in conftest.py is shared by its tests alone."""
