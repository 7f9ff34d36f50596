"""Timing clicks through the CT-SAM3D effect in the stand-in Slicer (shared by tests and bench/)."""

import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import qt


def timeEffectClicks(effect, pointsRAS: Sequence[Sequence[float]]) -> Tuple[List[float], List[float]]:
    """Seconds from each click on a fresh segment (N, then the click) to its result written, while Slicer's
    event loop runs (the GIL held between Python calls, as under PythonQt); and the gaps in seconds
    between the passes of the event loop that the effect made while it waited."""
    seconds, gaps = [], []
    for pointRAS in pointsRAS:
        effect.finishSegment()
        qt.pumpTimes.clear()
        started = time.perf_counter()
        if not effect.addPromptRAS(pointRAS, True):
            raise RuntimeError("the effect refused the click")
        qt.runEventLoop(lambda: not effect.isBusy(), timeoutSeconds=300)
        seconds.append(time.perf_counter() - started)
        gaps.extend(np.diff(qt.pumpTimes).tolist())
        if not effect.statusLabel.text.startswith("Done"):
            raise RuntimeError(f"the click did not complete: {effect.statusLabel.text}")
    return seconds, gaps


def timeClicksInTurns(session, effect, pointsRAS: Sequence[Sequence[float]],
                      alsoEach: Optional[Callable[[Sequence[float]], None]] = None):
    """For each point, the same click in plain Python (``session.set_clicks``, a fresh single click) and
    through the effect, in turns so that whatever else the machine does hits both alike; ``alsoEach(point)``
    runs after each pair. Returns (plain seconds, effect seconds, event-loop gaps)."""
    from CTSAM3DLib.world import ras_to_lps

    plain, inEffect, gaps = [], [], []
    for pointRAS in pointsRAS:
        started = time.perf_counter()
        session.set_clicks([(ras_to_lps(pointRAS), True)])
        plain.append(time.perf_counter() - started)
        seconds, clickGaps = timeEffectClicks(effect, [pointRAS])
        inEffect += seconds
        gaps += clickGaps
        if alsoEach is not None:
            alsoEach(pointRAS)
    return plain, inEffect, gaps
