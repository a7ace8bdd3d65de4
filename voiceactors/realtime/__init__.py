"""OpenAI Realtime API (GA) protocol: event Structs and the edge codecs."""

from __future__ import annotations

from .codec import ClientEventDecoder as ClientEventDecoder
from .codec import ClientEventEncoder as ClientEventEncoder
from .codec import ProtocolError as ProtocolError
from .codec import ServerEventDecoder as ServerEventDecoder
from .codec import ServerEventEncoder as ServerEventEncoder
from .codec import b64decode_strict as b64decode_strict
from .codec import b64encode as b64encode
from .codec import unknown_parameter as unknown_parameter
from .events import *  # noqa: F403
from .events import __all__ as _events_all

__all__ = [
    "ClientEventDecoder",
    "ClientEventEncoder",
    "ProtocolError",
    "ServerEventDecoder",
    "ServerEventEncoder",
    "b64decode_strict",
    "b64encode",
    "unknown_parameter",
    *_events_all,
]
