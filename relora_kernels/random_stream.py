"""The random streams' constants, imported by the kernels and by reference.py alike, so both keep the same bits.

Every random value is the top RANDOM_BITS of a 32-bit Philox-4x32-10 word (keyed by the seed, counted by the
element's index, docs/DESIGN.md section 5): the dropout masks compare them with an integer threshold, and the
reinitialised A is their value over 2**RANDOM_BITS, exact in fp32.
"""

from __future__ import annotations

RANDOM_BITS = 24
RANDOM_SHIFT = 32 - RANDOM_BITS  # a word's top RANDOM_BITS: word >> RANDOM_SHIFT
UNIT_SCALE = 1.0 / (1 << RANDOM_BITS)  # those bits as a uniform value in [0, 1)
WORDS_PER_DRAW = 4  # a dropout draw serves four neighbours of a row, one 32-bit word each


def dropout_threshold(dropout_p: float) -> int:
    """An element is kept when the top RANDOM_BITS of its word are >= this threshold."""
    return int(round(dropout_p * (1 << RANDOM_BITS)))
