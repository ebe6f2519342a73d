"""Eval stage: per-domain loss and exact match, in-domain versus out-of-domain, before versus after."""
