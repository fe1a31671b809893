"""Token roles and the shifted SFT / RL masks, on the worked example of masks.py."""

import pytest
import torch

from trapo_megatron.algo.masks import (
    CONTINUATION,
    IGNORE_LABEL,
    PAD,
    PREFIX,
    PROMPT,
    loss_masks,
    prefix_sft_carriers,
    shift_labels,
    token_roles,
)


def test_worked_example():
    roles = token_roles(torch.tensor([3]), torch.tensor([2]), torch.tensor([2]), seq_len=8)
    assert roles[0].tolist() == [PROMPT] * 3 + [PREFIX] * 2 + [CONTINUATION] * 2 + [PAD]
    sft, rl = loss_masks(roles, True)
    assert sft[0].int().tolist() == [0, 0, 1, 1, 0, 0, 0, 0]
    assert rl[0].int().tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    sft_shared, rl_shared = loss_masks(roles, False)
    assert not sft_shared.any() and torch.equal(rl_shared, rl)
    tokens = torch.arange(10, 18)
    assert shift_labels(tokens).tolist() == list(range(11, 18)) + [IGNORE_LABEL]


def test_batch_of_edge_cases():
    # unguided; all-prefix (L = 1.0 pure SFT sample); empty everything (padding row); sample filling seq_len
    roles = token_roles(
        torch.tensor([2, 2, 0, 1]), torch.tensor([0, 3, 0, 0]), torch.tensor([3, 0, 0, 4]), seq_len=5
    )
    sft, rl = loss_masks(roles, torch.tensor([True, True, True, False]))
    assert sft.int().tolist() == [[0] * 5, [0, 1, 1, 1, 0], [0] * 5, [0] * 5]
    assert rl.int().tolist() == [[0, 1, 1, 1, 0], [0] * 5, [0] * 5, [1, 1, 1, 1, 0]]
    assert (roles[2] == PAD).all()


def test_bad_lengths():
    with pytest.raises(ValueError, match="seq_len"):
        token_roles(torch.tensor([3]), torch.tensor([2]), torch.tensor([2]), seq_len=6)
    with pytest.raises(ValueError, match=">= 0"):
        token_roles(torch.tensor([-1]), torch.tensor([2]), torch.tensor([2]), seq_len=6)


def test_shared_prefix_counted_once():
    keys = [None, ("q0", 2), ("q0", 2), ("q0", 3), None, ("q1", 2), ("q0", 2)]
    assert prefix_sft_carriers(keys) == [False, True, False, True, False, True, False]
