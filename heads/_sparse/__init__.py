"""Pieces of the CVNet-DS sparsifier: location selection (training relaxations, extraction top-k),
the sparse storage codec (positions + fp16, int8 or int4 values) of the verifier's projected levels, and
what a dropped location holds when the verifier scores a sparse entry."""
