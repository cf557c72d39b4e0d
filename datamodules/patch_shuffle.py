"""Patch-shuffled negatives: an image's own tiles in a random order, as a "different" example.

Why: a correlation verifier trained on landmark pairs can learn "many locally similar features"
instead of "features that match in a consistent geometric layout". A crop of the anchor cut into a
``grid x grid`` mosaic and re-assembled in a random order keeps almost every local feature of the
anchor, so its correlation with the anchor is as strong as a true match's, but the matches no
longer move together across the image. Labelled "different", it asks the verifier to count only
geometrically consistent correspondences, the property that separates a true match from repeated
structure and texture-like distractors (grass, gravel, rows of windows) that no training pair shows.
On the 80-image demo it lowered the best unrelated score but not the re-ranked mAP
(docs/cvnet_demo_experiments.md); it is off by default.

Applied on the device after transfer, like Hide-and-Seek, to the batch rows that
:class:`datamodules.pairs.PairCollate` marks in ``batch["shuffled"]``; the permutations of step ``s``
depend only on ``(seed, s)`` and each mosaic's place in the step's batch over all ranks, so a resumed
run draws the same mosaics, and N processes the mosaics of one process with N times the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from datamodules.sampling import rank_share, step_generator

SHUFFLE_STREAM = 7


def tile_permutations(count: int, grid: int, generator: torch.Generator) -> Tensor:
    """``count`` permutations of ``grid * grid`` tiles, (count, grid * grid), never the identity."""
    if grid < 2:
        raise ValueError(f"shuffle_tiles needs grid >= 2 (a 1x1 mosaic is the image), got {grid}")
    return torch.stack([_non_identity_permutation(grid * grid, generator) for _ in range(count)]) if count \
        else torch.zeros(0, grid * grid, dtype=torch.long)


def step_permutations(seed: int, step: int, count: int, grid: int, rank: int = 0, world_size: int = 1,
                      unit: int = 1) -> Tensor:
    """The ``count`` mosaic permutations of this rank at ``step``: drawn for all ranks' mosaics, this
    rank keeping its units of ``unit`` (:func:`~datamodules.sampling.rank_share`)."""
    generator = step_generator(seed, step, stream=SHUFFLE_STREAM)
    return rank_share(tile_permutations(count * world_size, grid, generator), rank, world_size, unit)


def shuffle_tiles(images: Tensor, grid: int, perms: Tensor) -> Tensor:
    """``images`` (B, 3, H, W) with each image's ``grid x grid`` tiles permuted by its row of ``perms``
    (B, grid * grid) (a new tensor).

    Tiles are ``H // grid`` by ``W // grid`` pixels; the remainder rows and columns (bottom and
    right) stay in place.
    """
    if images.dim() != 4:
        raise ValueError(f"shuffle_tiles expects (B, C, H, W) images, got {tuple(images.shape)}")
    if grid < 2:
        raise ValueError(f"shuffle_tiles needs grid >= 2 (a 1x1 mosaic is the image), got {grid}")
    b, c, h, w = images.shape
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise ValueError(f"images of {h}x{w} are too small for a {grid}x{grid} mosaic")
    n = grid * grid
    if tuple(perms.shape) != (b, n):
        raise ValueError(f"shuffle_tiles needs one permutation of {n} tiles per image, got {tuple(perms.shape)}")
    perms = perms.to(images.device)
    body = images[:, :, : th * grid, : tw * grid]
    tiles = body.reshape(b, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, n, c, th, tw)
    tiles = tiles[torch.arange(b, device=images.device)[:, None], perms]
    body = tiles.reshape(b, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(b, c, th * grid, tw * grid)
    out = images.clone()
    out[:, :, : th * grid, : tw * grid] = body
    return out


def _non_identity_permutation(n: int, generator: torch.Generator) -> Tensor:
    while True:
        perm = torch.randperm(n, generator=generator)
        if not torch.equal(perm, torch.arange(n)):
            return perm
