"""Benchmark stage: latency, memory and a per-layer profile, measured on the device over TVM RPC.

There is one way to measure: through an RPC session (``session.measure``). This machine is a device
too (an agent on 127.0.0.1), so host figures and board figures come from the same code.
``bundle.measure_bundle`` measures a build where its deployment says, ``remeasure`` a built bundle.
"""

from .bundle import Measured, measure_bundle, remeasure
from .session import (Measurement, QuietTimer, measure, quiet_time, quiet_times, time_alone_quietly,
                      time_quietly)

__all__ = ["Measured", "Measurement", "QuietTimer", "measure", "measure_bundle", "quiet_time", "quiet_times", "remeasure",
           "time_alone_quietly", "time_quietly"]
