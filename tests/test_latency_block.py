"""ORT's channel block, asked of ORT, and the blocked-layout rule the latency table files ops under."""

from __future__ import annotations

import pytest

from sslcompress.latency import current_key
from sslcompress.latency.block import _blocked, nchwc_block, nchwc_input_alignment
from sslcompress.latency.signature import Signature, blocked, off_block, on_block, padded


def test_the_block_is_where_ort_stops_taking_a_conv_in_blocks():
    b = nchwc_block("cpu")
    assert b in (1, 8, 16)
    if b > 1:
        # ORT's own optimiser: whole blocks and fewer channels than a block are blocked, the rest plain.
        assert _blocked(b) and _blocked(2 * b) and _blocked(b - 1)
        assert not _blocked(b + 1) and not _blocked(2 * b - 1)
    else:
        assert not _blocked(64)
    assert current_key().block == b


def test_the_cuda_provider_has_no_channel_block():
    assert nchwc_block("cuda") == 1


def _conv(cin: int, cout: int, groups: int = 1) -> Signature:
    return Signature("conv", cout, cin, (3, 3), groups=groups, in_hw=(8, 8))


@pytest.mark.parametrize(("width", "block", "align", "expected"), [
    (24, 8, 8, True), (24, 16, 16, False), (24, 16, 4, True), (22, 16, 4, False), (12, 16, 16, True),
    (17, 16, 4, False), (32, 16, 16, True), (20, 8, 4, True), (20, 8, 8, False)])
def test_a_plain_conv_is_blocked_by_its_input_width(monkeypatch, width, block, align, expected):
    """Narrower than a block, or a multiple of ORT's input alignment: the block in older onnxruntimes, 4 in
    1.32 (its ReorderInput pads to whole blocks)."""
    from sslcompress.latency import block as block_module

    monkeypatch.setattr(block_module, "nchwc_input_alignment", lambda provider="cpu": align)
    assert on_block(width, block, align) is expected
    assert on_block(width, block) is expected  # the alignment ORT reports, by default
    assert blocked(_conv(64, 64), width, 40, block) is expected  # the output width does not decide


def test_the_input_alignment_is_what_this_onnxruntime_does():
    """on_block with the alignment ORT reports agrees with ORT's own rewrite of a plain conv, width by width."""
    block = nchwc_block()
    if block <= 1:
        pytest.skip("this CPU has no blocked conv layout in onnxruntime")
    assert nchwc_input_alignment() in (1, 2, 4, 8, block)
    for width in range(1, 2 * block + 9):
        assert on_block(width, block) is _blocked(width), width


def test_without_blocks_every_width_is_one_kind_and_none_runs_blocked():
    assert on_block(5, 1) and on_block(64, 1)
    assert not blocked(_conv(64, 64), 64, 64, 1)


def test_grouped_and_depthwise_convs_are_blocked_by_their_channels_per_group():
    dw = _conv(32, 64, groups=32)
    assert dw.depthwise
    assert blocked(dw, 16, 32, 8) and not blocked(dw, 15, 30, 8) and not blocked(dw, 12, 24, 16)
    grouped = _conv(64, 64, groups=4)  # 16 in and 16 out per group
    assert blocked(grouped, 64, 64, 16) and blocked(grouped, 64, 64, 8)
    assert not blocked(grouped, 32, 32, 16)  # 8 per group: not whole blocks of 16
    assert not blocked(Signature("linear", 64, 64), 64, 64, 8)


def test_off_block_widths_and_padding():
    # 7 is narrower than a block: ORT takes it blocked; 9 is the narrowest width it does not
    assert off_block([8, 16, 24, 32], 8) == [9, 15, 23, 31]
    assert off_block([16, 32, 48], 16) == [17, 31, 47]
    assert off_block([4, 8], 8) == []  # no width of two blocks: nothing plain to measure below it
    assert off_block([8, 16], 1) == []
    assert padded(21, 8) == 24 and padded(21, 16) == 32 and padded(21, 1) == 21 and padded(32, 16) == 32
