"""Background decode and encode helpers of tasks.media (no model)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import pytest

from tasks.base import FailureKind, ItemFailure
from tasks.media import ReadAhead, VideoWriter, iter_frames


def test_read_ahead_yields_in_order_raises_and_stops_its_producer():
    with ReadAhead(range(100), depth=3) as items:
        assert list(items) == list(range(100))
        assert list(items) == []  # exhausted stays exhausted

    def failing() -> Iterator[int]:
        yield 1
        raise ItemFailure(FailureKind.FORMAT, "broken")

    with ReadAhead(failing(), depth=2) as items, pytest.raises(ItemFailure, match="broken"):
        list(items)

    closed = threading.Event()

    def endless() -> Iterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    with ReadAhead(endless(), depth=2) as items:
        assert next(items) == 0
    assert closed.is_set()  # leaving early closed the producer in its own thread


def test_write_behind_encodes_the_same_video(tmp_path):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (30, 64, 64, 3), dtype=np.uint8)
    frames[:, 16:48, 16:48] = 200  # something the encoder keeps
    outputs = {}
    for behind in (0, 2):
        path = tmp_path / f"w{behind}.mp4"
        with VideoWriter(path, 64, 64, 25.0, preset="ultrafast", write_behind=behind) as w:
            for i in range(0, 30, 7):
                w.write(frames[i : i + 7].copy())
        assert w.frames == 30
        outputs[behind] = np.concatenate(list(iter_frames(path, 64, 64)))
    assert outputs[0].shape == (30, 64, 64, 3)
    assert np.array_equal(outputs[0], outputs[2])


def test_an_error_inside_the_writer_block_is_the_one_raised(tmp_path):
    unwritable = tmp_path / "missing" / "x.mp4"  # the encoder fails too
    with pytest.raises(ItemFailure) as e, VideoWriter(unwritable, 64, 64, 25.0):
        pass
    assert e.value.kind == FailureKind.FFMPEG
    with pytest.raises(KeyError), VideoWriter(unwritable, 64, 64, 25.0, write_behind=2) as w:
        w.write(np.zeros((3, 64, 64, 3), np.uint8))
        raise KeyError("the caller's failure, not the encoder's")
