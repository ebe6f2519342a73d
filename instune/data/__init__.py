"""Data stage: read -> normalise -> filter -> dedup -> score/select -> mix -> tokenize -> pack."""
