"""The embedded Realtime GA simulator: deterministic, scriptable, with fault injection.

``Simulator`` serves ``ws://HOST:PORT/v1/realtime?model=...``; ``serve_simulator`` is the
nursery-start form; ``SimConfig`` holds its behaviour; scripts (``load_script``) decide
what it answers and fault plans (``load_fault_plan``) how it misbehaves. See
``voiceactors.testing.sim.open_simulator`` for tests.
"""

from __future__ import annotations

from .config import SimConfig as SimConfig
from .faults import Fault as Fault
from .faults import FaultPlan as FaultPlan
from .faults import load_fault_plan as load_fault_plan
from .faults import parse_fault_plan as parse_fault_plan
from .script import FunctionCall as FunctionCall
from .script import Reply as Reply
from .script import Script as Script
from .script import ScriptError as ScriptError
from .script import load_script as load_script
from .script import parse_script as parse_script
from .server import RunningSimulator as RunningSimulator
from .server import Simulator as Simulator
from .server import serve_simulator as serve_simulator
from .session import ConnectionRecord as ConnectionRecord
from .vad import threshold_to_dbfs as threshold_to_dbfs

__all__ = [
    "RunningSimulator",
    "ConnectionRecord",
    "Fault",
    "FaultPlan",
    "FunctionCall",
    "Reply",
    "Script",
    "ScriptError",
    "SimConfig",
    "Simulator",
    "load_fault_plan",
    "load_script",
    "parse_fault_plan",
    "parse_script",
    "serve_simulator",
    "threshold_to_dbfs",
]
