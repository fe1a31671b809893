"""Token-level prefix cuts on real-looking expert text: ratios, paragraph snapping, L=1.0 + EOS."""

import json
import math

import pytest
from rollout_tiny import FIXTURE, tiny_tokenizer

from trapo_megatron.algo.micro_groups import MicroGroupConfig
from trapo_megatron.data.prefix import cut_index, cut_prefix, paragraph_token_ids, think_text


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def expert(tok):
    with open(FIXTURE) as f:
        row = json.loads(f.readline())
    return think_text(row["solution"])


@pytest.mark.parametrize(
    "n,ratio,positions,window,expected",
    [
        (20, 0.25, [7], 0.3, 8),  # int(5) -> first break after 5 is at 7 < 11: cut just after it
        (20, 0.25, [5, 9], 0.3, 10),  # a break AT the raw cut does not count (official: idx > threshold)
        (20, 0.25, [11], 0.3, 5),  # 11 is not < (0.25 + 0.3) * 20 = 11: keep the raw cut
        (20, 0.25, [7], 0.0, 5),  # snapping off
        (20, 0.5, [], 0.3, 10),
    ],
)
def test_cut_index_table(n, ratio, positions, window, expected):
    assert (
        cut_index(n, ratio, rounding="floor", snap_window=window, paragraph_positions=positions) == expected
    )


def test_think_text():
    assert think_text("<think>\nA.\n\nB.\n</think>\n\nSo \\boxed{1}.") == "A.\n\nB."
    assert think_text("no tags \\boxed{2}") == "no tags \\boxed{2}"
    assert think_text("<think>\ncut at the limit ") == "<think>\ncut at the limit"  # as the official code


def test_paper_cut_is_ceil_of_ratio(tok, expert):
    ids = tok(expert, add_special_tokens=False)["input_ids"]
    cfg = MicroGroupConfig(mode="paper")
    for ratio in (0.2, 0.5):
        prefix = cut_prefix(ids, ratio, cfg, eos_id=tok.eos_token_id, paragraph_ids=paragraph_token_ids(tok))
        assert prefix == ids[: math.ceil(ratio * len(ids))]


def test_official_cut_snaps_to_paragraph(tok, expert):
    ids = tok(expert, add_special_tokens=False)["input_ids"]
    para = paragraph_token_ids(tok)
    assert para, "the tiny tokenizer must have a paragraph-break token"
    cfg = MicroGroupConfig(mode="official")
    prefix = cut_prefix(ids, 0.25, cfg, eos_id=tok.eos_token_id, paragraph_ids=para)
    raw = int(0.25 * (len(ids) + 1))  # official: |y*| counts the EOS
    assert len(prefix) > raw and prefix[-1] in para and prefix == ids[: len(prefix)]
    assert tok.decode(prefix).endswith("\n\n")
    assert not any(t in para for t in ids[raw + 1 : len(prefix) - 1])  # the FIRST break after the cut
    text = tok.decode(prefix)
    assert text.startswith("We need to isolate") and text.count("\n\n") == 2, text


def test_official_cut_without_break_in_window(tok):
    text = "Step one is long " * 12 + "\n\nEnd."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    cfg = MicroGroupConfig(mode="official")
    prefix = cut_prefix(ids, 0.25, cfg, eos_id=tok.eos_token_id, paragraph_ids=paragraph_token_ids(tok))
    assert prefix == ids[: int(0.25 * (len(ids) + 1))]


@pytest.mark.parametrize("mode", ["paper", "official"])
def test_full_ratio_is_trace_plus_eos(tok, expert, mode):
    ids = tok(expert, add_special_tokens=False)["input_ids"]
    prefix = cut_prefix(ids, 1.0, MicroGroupConfig(mode=mode), eos_id=tok.eos_token_id)
    assert prefix == ids + [tok.eos_token_id]
    assert cut_prefix(ids, 0.0, MicroGroupConfig(mode=mode), eos_id=tok.eos_token_id) == []
