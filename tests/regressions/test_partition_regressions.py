"""Minimal graphs the property tests (tests/test_properties.py) shrank failures to.

Each case is the smallest model that shows one lcpc failure; it stays here, as a fixed
regression, after the fix. While the bug is open the case is a strict xfail naming it.

Fixed: passes/partition.py used to fill one branch after another up to ceil(C/K)
channels, leaving the last branch empty (6 channels, K = 4: [2, 2, 2, 0]) or unbalancing
a tensor made of Split/Slice/Concat pieces; it now fills to floor(C/K), spreads the
remainders over the branches least over their share across all tensors a class is in,
repairs crossing pieces by local search and, failing that, balances as an integer program.
"""

from __future__ import annotations

import pytest
from test_graph_shapes import HEAD, HEADER, assert_exact, make, plan_of
from test_properties import assert_balanced

SPLIT = HEADER + """
agraph (float[1,3,8,8] input, float[{c},3,3,3] w0, float[{c}] b0, float[10,{c}] fc, float[10] fcb)
        => (float[1,10] y) {{
  x = Conv <pads = [1,1,1,1]> (input, w0, b0)
  sz = Constant <value = int64[2] {{{h}, {h}}}> ()
  a, b = Split <axis = 1> (x, sz)
  cat = Concat <axis = 1> (a, b)""" + HEAD.format(x="cat") + "\n}}"

CONCAT = HEADER + """
agraph (float[1,3,8,8] input, float[{c},3,3,3] wa, float[{c},3,3,3] wb, float[8,{c2},1,1] w2,
        float[10,8] fc, float[10] fcb) => (float[1,10] y) {{
  a = Conv <pads = [1,1,1,1]> (input, wa)
  b = Conv <pads = [1,1,1,1]> (input, wb)
  cat = Concat <axis = 1> (a, b)
  c2 = Conv (cat, w2)""" + HEAD.format(x="c2") + "\n}}"

CONCAT3 = HEADER + """
agraph (float[1,3,8,8] input, float[{a},3,3,3] wa, float[{b},3,3,3] wb, float[{c},3,3,3] wc,
        float[8,{n},1,1] w2, float[10,8] fc, float[10] fcb) => (float[1,10] y) {{
  a = Conv <pads = [1,1,1,1]> (input, wa)
  b = Conv <pads = [1,1,1,1]> (input, wb)
  c = Conv <pads = [1,1,1,1]> (input, wc)
  cat = Concat <axis = 1> (a, b, c)
  c2 = Conv (cat, w2)""" + HEAD.format(x="c2") + "\n}}"


def concat3(a: int, b: int, c: int) -> str:
    return CONCAT3.format(a=a, b=b, c=c, n=a + b + c)


ONE_CONV = HEADER + """
agraph (float[1,3,8,8] input, float[6,3,3,3] w0, float[10,6] fc, float[10] fcb) => (float[1,10] y) {
  x = Conv <pads = [1,1,1,1]> (input, w0)
  r = Relu (x)""" + HEAD.format(x="r") + "\n}"

CROSSING = HEADER + """
agraph (float[1,3,8,8] input, float[32,3,3,3] w0, float[12,12,3,3] w1, float[10,32] fc, float[10] fcb)
        => (float[1,10] y) {
  x = Conv <pads = [1,1,1,1]> (input, w0)
  z = Constant <value = int64[1] {0}> ()
  c = Constant <value = int64[1] {12}> ()
  e = Constant <value = int64[1] {32}> ()
  ax = Constant <value = int64[1] {1}> ()
  a = Slice (x, z, c, ax)
  t = Slice (x, c, e, ax)
  h = Conv <pads = [1,1,1,1]> (a, w1)
  cat = Concat <axis = 1> (h, t)
  sz = Constant <value = int64[2] {16, 16}> ()
  s0, s1 = Split <axis = 1> (cat, sz)
  both = Concat <axis = 1> (s0, s1)""" + HEAD.format(x="both") + "\n}"

CASES = {
    # refused: "--branches 4 is larger than the channel space of tensor 'x' ... 6 channels in 6 groups"
    "conv_6_k4": (ONE_CONV, 4),
    # refused: "--branches 3 is larger than the channel space of tensor 'a' ... 4 channels in 4 groups"
    "split_8_into_4_4_k3": (SPLIT.format(c=8, h=4), 3),
    # planned, but branch 0 owns 6 of the 20 channels of x (ceil(20/4) = 5): [6, 5, 5, 4]
    "split_20_into_10_10_k4": (SPLIT.format(c=20, h=10), 4),
    # refused: "--branches 4 is larger than the channel space of tensor 'a' ... 6 channels in 6 groups"
    "concat_6_6_k4": (CONCAT.format(c=6, c2=12), 4),
    # planned, but cat's 20 channels are owned [8, 8, 4] (ceil(20/3) = 7)
    "concat_10_10_k3": (CONCAT.format(c=10, c2=20), 3),
    # planned even for K = 2, but x's 32 channels are owned [15, 17] (K = 3: [10, 10, 12]):
    # Split pieces that straddle the Slice pieces they come from; a balanced partition
    # exists (every piece halved, 16/16)
    "slice_then_split_across_k2": (CROSSING, 2),
    # the pieces' remainders all land on branch 0: cat's 10 channels are owned [6, 4]
    "concat_3_3_4_k2": (concat3(3, 3, 4), 2),
    # refused: "--branches 3 is larger than the channel space of tensor 'c' ... 4 channels"
    "concat_4_4_4_k3": (concat3(4, 4, 4), 3),
    # the third piece's 6 channels are owned [1, 3, 2] (ceil(6/3) = 2)
    "concat_4_4_6_k3": (concat3(4, 4, 6), 3),
}

@pytest.mark.parametrize("case", list(CASES))
def test_partition_of_split_pieces(case, tmp_path):
    text, k = CASES[case]
    model = make(text)
    assert_balanced(plan_of(model, k))
    assert_exact(model, k, tmp_path / "out")
