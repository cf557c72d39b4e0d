"""Pieces of the CVNet-DS sparsifier: location selection (training relaxations, extraction top-k)
and the sparse storage codec (positions + fp16/int8 values) of the verifier's projected levels."""
