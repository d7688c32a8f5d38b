"""The pure pieces of label scoring: the prefix tree the labels are packed into, its mask, the formulas."""

from __future__ import annotations

import math

import pytest
import torch

from worker.runtime.scoring import (
    Candidate,
    PackedTree,
    answer_logprobs,
    attention_mask,
    common_prefix,
    exclusive_scores,
    forward_groups,
    yes_no_scores,
)


def test_shared_tokens_are_packed_once_and_each_sees_only_its_ancestors() -> None:
    tree = PackedTree.build([[5, 6, 1], [5, 6, 7, 1], [8, 1]])  # "stop</s>", "stop sign</s>", "go</s>"
    assert tree.tokens == [5, 6, 1, 7, 1, 8, 1]
    assert tree.parents == [-1, 0, 1, 1, 3, -1, 5]
    assert tree.depths == [0, 1, 2, 2, 3, 0, 1]
    assert tree.paths == [[0, 1, 2], [0, 1, 3, 4], [5, 6]]
    seen = tree.visibility()
    assert seen[4].nonzero().flatten().tolist() == [0, 1, 3, 4]  # not node 2: the other label's end
    assert seen[6].nonzero().flatten().tolist() == [5, 6]


def test_mask_sees_the_whole_prefix_boolean_for_sdpa_additive_for_eager() -> None:
    tree = PackedTree.build([[5, 1], [6, 1]])
    boolean = attention_mask([tree], [3], attention="sdpa", dtype=torch.float32)
    assert boolean.shape == (1, 1, 4, 7) and boolean.dtype == torch.bool
    assert boolean[0, 0, :, :3].all() and boolean[0, 0, 2, 3:].tolist() == [False, False, True, False]
    additive = attention_mask([tree], [3], attention="eager", dtype=torch.float32)
    assert (additive == 0).equal(boolean) and additive.min() == torch.finfo(torch.float32).min


def test_mask_of_several_images_pads_each_prefix_left_and_each_tree_right() -> None:
    small, big = PackedTree.build([[5, 1]]), PackedTree.build([[5, 1], [6, 7, 1]])
    mask = attention_mask([small, big], [2, 4], attention="sdpa", dtype=torch.float32)
    assert mask.shape == (2, 1, 5, 4 + 5)  # widest prefix 4, most nodes 5
    row = mask[0, 0]
    assert row[:2, :2].any().item() is False and row[:2, 2:4].all()  # left padding hidden, prefix seen
    assert row[1, 4:].tolist() == [True, True, False, False, False]
    for padding in (2, 3, 4):  # a padding node sees itself only: never a row of nothing (NaN)
        assert row[padding].nonzero().flatten().tolist() == [4 + padding]
    assert mask[1, 0, :, :4].all() and mask[1, 0, 4, 4:].tolist() == [False, False, True, True, True]


def test_answer_logprobs_sum_the_answer_tokens_from_where_each_starts() -> None:
    # prefix of 2 shared tokens; candidate 0 starts scoring at its 3rd token, candidate 1 at its 4th
    candidates = [Candidate((9, 9, 5, 1), 2), Candidate((9, 9, 6, 7, 1), 3)]
    tree = PackedTree.build([c.ids[2:] for c in candidates])
    kept = tree.predicting(candidates, 2)
    logprobs = torch.log(torch.full((1 + len(kept), 10), 0.1))
    logprobs[0, 5] = -1.0  # after the prefix: token 5
    logprobs[1 + kept.index(0), 1] = -2.0  # after node 0 (token 5): the end token
    logprobs[1 + kept.index(2), 7] = -3.0  # after node 2 (token 6): token 7
    logprobs[1 + kept.index(3), 1] = -4.0  # after node 3 (token 7): the end token
    assert answer_logprobs(candidates, 2, tree, logprobs) == pytest.approx([-3.0, -7.0])


def test_formulas() -> None:
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert exclusive_scores([math.log(0.2), math.log(0.6)]) == pytest.approx([0.25, 0.75])
    assert yes_no_scores([math.log(0.3), -1e4, 0.0], [math.log(0.1), 0.0, -1e4]) == pytest.approx(
        [0.75, 0.0, 1.0]
    )


def test_images_of_similar_shape_share_a_forward_and_padding_stays_bounded() -> None:
    assert forward_groups([(2400, 30)] * 4) == [[0, 1, 2, 3]]
    # 30-node rows beside 242-node rows would be padded 8x: they go apart; the two alike go together.
    assert forward_groups([(2404, 30), (2358, 242), (2404, 30), (1182, 242)]) == [[0, 2], [3], [1]]
    shapes = [(w, n) for w in (100, 900, 2400, 2500) for n in (3, 30, 31, 200, 242)]
    for waste in (1.0, 1.25, 2.0):
        groups = forward_groups(shapes, waste)
        assert sorted(i for group in groups for i in group) == list(range(len(shapes)))
        for group in groups:
            width, nodes = max(shapes[i][0] for i in group), max(shapes[i][1] for i in group)
            own = sum(shapes[i][1] * (shapes[i][0] + shapes[i][1]) for i in group)
            assert len(group) * nodes * (width + nodes) <= waste * own
