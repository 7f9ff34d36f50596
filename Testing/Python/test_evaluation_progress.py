"""The stderr progress bar."""

import io

import pytest

from CTSAM3DLib.progress import ProgressBar, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_stream_gets_whole_lines_and_the_final_state():
    stream = io.StringIO()
    with ProgressBar(3, "scan", stream=stream, log_interval_s=0.0) as bar:
        for name in ("a", "b", "c"):
            bar.update(status=name)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("scan [") and "0/3" in lines[0]
    assert "3/3" in lines[-1] and lines[-1].endswith("c") and "#" * 24 in lines[-1]


def test_log_stream_is_throttled():
    stream = io.StringIO()
    with ProgressBar(100, stream=stream, log_interval_s=3600.0) as bar:
        for _ in range(100):
            bar.update()
    assert len(stream.getvalue().splitlines()) == 2  # the first line and the final one


def test_terminal_redraws_in_place():
    stream = Terminal()
    assert list(progress(range(4), 4, "x", stream=stream)) == [0, 1, 2, 3]
    text = stream.getvalue()
    assert text.count("\r") == 5 and text.endswith("\n") and "4/4" in text


def test_overshoot_is_clamped_and_negative_total_refused():
    bar = ProgressBar(2, stream=io.StringIO())
    bar.update(5)
    assert bar.done == 2
    with pytest.raises(ValueError):
        ProgressBar(-1)
