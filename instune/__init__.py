"""instune: instruction tuning on Ray — data (Ray Data), train (Ray Train), sweep (Ray Tune), eval."""

__version__ = "0.1.0"
