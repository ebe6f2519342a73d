"""Sweeps: Ray Tune trials of the experiment config, one Ray Train run each (`instune sweep`)."""
