"""``python -m voiceactors run``: one session from WAV files, through the runtime's actors.

Theory of operation
-------------------
The runner plays a person at a device. The runtime is opened exactly as the gateway opens
it (:func:`voiceactors.runtime.open_runtime_from_config`, the embedded simulator upstream
by default) and given one session whose client socket is an in-memory pair
(:func:`memory_client_pair`) instead of a WebSocket. On the other end a
:class:`VirtualClient` behaves like a phone:

- **Microphone.** After ``session.update`` is answered, it streams without a gap: each
  input WAV (converted offline to the client format), silence between inputs, trailing
  silence after the last one, 20 ms per ``input_audio_buffer.append``. Chunk ``k`` is
  captured during ``[t0 + 20k ms, t0 + 20(k+1) ms)`` on the Trio clock and sent when its
  capture ends, so an audio position ``p`` ms on the session's input timeline was captured
  at ``t0 + p``: that is how the server's ``audio_end_ms`` becomes a time.
- **Turns.** Input N+1 starts once the response to input N has been created, is done and
  has played out (and the server hears no speech) for a short settle time. With
  ``barge_in_at_ms`` the *last* input instead starts that long after the previous turn's
  audio began to play: a barge-in.
- **Loudspeaker.** :class:`Playout` plays agent audio at real (Trio) time from the moment it
  arrives, drops what it holds on ``output_audio_buffer.cleared``, and knows to the sample
  what it played of each item; the client reports that (``voiceactors.playback``) every
  100 ms and right after a flush, and keeps the played audio for ``--output``.

Every figure of the :class:`RunReport` is measured from events received and the clock;
nothing is assumed. ``--speed X`` runs the whole ``trio.run`` (client, runtime, simulator)
on ``trio.testing.MockClock(rate=X)``.

The parts
---------
Imports go one way, down this list:

- :mod:`.cli`: ``add_arguments``/``run`` for ``python -m voiceactors``, argument checks.
- :mod:`.session`: :func:`run_session`, the runtime and the client wired together.
- :mod:`.report`: :class:`RunReport` and :func:`format_report`.
- :mod:`.client`: :class:`VirtualClient`.
- :mod:`.device`: :class:`Playout`, the loudspeaker.
- :mod:`.inputs`: :class:`ClientInput`, the WAV files as the microphone sends them.
- :mod:`.pair`: :func:`memory_client_pair`, the in-memory socket.
"""

from .cli import FORMATS as FORMATS
from .cli import add_arguments as add_arguments
from .cli import main as main
from .cli import options_from_args as options_from_args
from .cli import run as run
from .client import VirtualClient as VirtualClient
from .device import ItemPlay as ItemPlay
from .device import Playout as Playout
from .inputs import ClientInput as ClientInput
from .inputs import UsageError as UsageError
from .inputs import load_input as load_input
from .inputs import silence as silence
from .pair import MemoryPort as MemoryPort
from .pair import memory_client_pair as memory_client_pair
from .report import BargeInReport as BargeInReport
from .report import FramesReport as FramesReport
from .report import ResponseReport as ResponseReport
from .report import RunReport as RunReport
from .report import TurnReport as TurnReport
from .report import format_report as format_report
from .session import RunOptions as RunOptions
from .session import run_session as run_session

__all__ = [
    "BargeInReport",
    "ClientInput",
    "FORMATS",
    "FramesReport",
    "ItemPlay",
    "MemoryPort",
    "Playout",
    "ResponseReport",
    "RunOptions",
    "RunReport",
    "TurnReport",
    "UsageError",
    "VirtualClient",
    "add_arguments",
    "format_report",
    "load_input",
    "main",
    "memory_client_pair",
    "options_from_args",
    "run",
    "run_session",
    "silence",
]
