"""Scoring and ranking a gallery: the Scorer protocol, pair heads and fixed metrics with their fast forms,
re-rankers (fixed and learned), CSLS, chunked top-k and neighbours, sharded ranking."""
