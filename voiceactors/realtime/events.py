"""OpenAI Realtime API (GA) events as msgspec Structs.

Theory of operation
-------------------
Every event is a frozen Struct tagged on ``type`` with its GA name; the two unions
``ClientEvent`` (the 11 events a client sends) and ``ServerEvent`` (the server events the
runtime handles) are what the codecs in :mod:`voiceactors.realtime.codec` decode into.

Two rules keep the wire exact:

* Optional fields default to ``msgspec.UNSET`` and are never encoded while unset, so the
  difference between "absent" and ``null`` survives a round trip (``turn_detection: null``
  switches server VAD off; leaving it out keeps the current setting). Server events, which
  the runtime only reads, use ``None`` defaults like the SDK's models.
* Client events forbid unknown top-level fields (a misspelled ``audio`` is an error, not a
  silent drop). Nested config and item structs accept unknown fields, because the same
  structs decode what the real server sends back and it adds fields over time; the
  client decoder checks nested names separately (see ``codec.unknown_parameter``).

Audio stays base64 ``str`` in ``InputAudioBufferAppend.audio`` and
``ResponseOutputAudioDelta.delta``: a relay forwards it untouched and decodes only when it
needs the samples (``codec.b64decode_strict``).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "BETA_EVENT_NAMES",
    "AudioConfig",
    "AudioFormat",
    "AudioInput",
    "AudioOutput",
    "ClientEvent",
    "ContentPart",
    "ConversationInfo",
    "ConversationCreated",
    "ConversationItemAdded",
    "ConversationItemCreate",
    "ConversationItemCreated",
    "ConversationItemDelete",
    "ConversationItemDeleted",
    "ConversationItemDone",
    "ConversationItemRetrieve",
    "ConversationItemRetrieved",
    "ConversationItemTruncate",
    "ConversationItemTruncated",
    "ErrorDetail",
    "ErrorEvent",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "FunctionTool",
    "InputAudioBufferAppend",
    "InputAudioBufferClear",
    "InputAudioBufferCleared",
    "InputAudioBufferCommit",
    "InputAudioBufferCommitted",
    "InputAudioBufferSpeechStarted",
    "InputAudioBufferSpeechStopped",
    "InputAudioBufferTimeoutTriggered",
    "InputAudioTranscriptionCompleted",
    "InputAudioTranscriptionDelta",
    "InputAudioTranscriptionFailed",
    "Item",
    "MessageItem",
    "NoiseReduction",
    "OutputAudioBufferClear",
    "OutputAudioBufferCleared",
    "OutputAudioBufferStarted",
    "OutputAudioBufferStopped",
    "RateLimit",
    "RateLimitsUpdated",
    "Response",
    "ResponseCancel",
    "ResponseContentPartAdded",
    "ResponseContentPartDone",
    "ResponseCreate",
    "ResponseCreateParams",
    "ResponseCreated",
    "ResponseDone",
    "ResponseFunctionCallArgumentsDelta",
    "ResponseFunctionCallArgumentsDone",
    "ResponseOutputAudioDelta",
    "ResponseOutputAudioDone",
    "ResponseOutputAudioTranscriptDelta",
    "ResponseOutputAudioTranscriptDone",
    "ResponseOutputItemAdded",
    "ResponseOutputItemDone",
    "ResponseOutputTextDelta",
    "ResponseOutputTextDone",
    "ResponsePart",
    "ServerEvent",
    "Session",
    "SessionCreated",
    "SessionUpdate",
    "SessionUpdated",
    "StatusDetails",
    "ToolChoiceFunction",
    "Transcription",
    "TurnDetection",
    "UnknownServerEvent",
    "Usage",
    "VoiceId",
    "client_event_types",
    "server_event_types",
]


class _Model(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Nested config/item data: lenient on decode, never encodes an unset field."""


class _Reported(msgspec.Struct, frozen=True, kw_only=True):
    """Data only the server sends: encoded in full, nulls included, as upstream does."""


# --------------------------------------------------------------------------- session


class AudioFormat(_Model):
    """``audio/pcm`` (PCM16 LE mono, ``rate`` 24000 only), ``audio/pcmu`` or ``audio/pcma``
    (G.711 at 8 kHz)."""

    type: Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
    rate: int | UnsetType = UNSET


class Transcription(_Model):
    model: str | UnsetType = UNSET
    language: str | UnsetType = UNSET
    prompt: str | UnsetType = UNSET


class NoiseReduction(_Model):
    type: Literal["near_field", "far_field"] | UnsetType = UNSET


class TurnDetection(_Model):
    """``server_vad`` (threshold, padding, silence) or ``semantic_vad`` (eagerness)."""

    type: Literal["server_vad", "semantic_vad"]
    threshold: float | UnsetType = UNSET
    prefix_padding_ms: int | UnsetType = UNSET
    silence_duration_ms: int | UnsetType = UNSET
    idle_timeout_ms: int | None | UnsetType = UNSET
    create_response: bool | UnsetType = UNSET
    interrupt_response: bool | UnsetType = UNSET
    eagerness: Literal["low", "medium", "high", "auto"] | UnsetType = UNSET


class AudioInput(_Model):
    format: AudioFormat | UnsetType = UNSET
    transcription: Transcription | None | UnsetType = UNSET
    noise_reduction: NoiseReduction | None | UnsetType = UNSET
    turn_detection: TurnDetection | None | UnsetType = UNSET


class VoiceId(_Model):
    id: str


class AudioOutput(_Model):
    format: AudioFormat | UnsetType = UNSET
    voice: str | VoiceId | UnsetType = UNSET
    speed: float | UnsetType = UNSET


class AudioConfig(_Model):
    input: AudioInput | UnsetType = UNSET
    output: AudioOutput | UnsetType = UNSET


class FunctionTool(_Model, tag_field="type", tag="function"):
    name: str
    description: str | UnsetType = UNSET
    parameters: dict[str, Any] | UnsetType = UNSET


class ToolChoiceFunction(_Model, tag_field="type", tag="function"):
    name: str


class Session(_Model, tag_field="type", tag="realtime"):
    """A realtime session's config: what ``session.update`` sends (only the fields that
    change) and what ``session.created``/``session.updated`` return (all of them, plus the
    server's ``id``/``object``/``expires_at``)."""

    model: str | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    output_modalities: list[Literal["text", "audio"]] | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: str | ToolChoiceFunction | UnsetType = UNSET
    max_output_tokens: int | str | UnsetType = UNSET
    truncation: str | dict[str, Any] | UnsetType = UNSET
    include: list[str] | None | UnsetType = UNSET
    tracing: str | dict[str, Any] | None | UnsetType = UNSET
    prompt: dict[str, Any] | None | UnsetType = UNSET
    # Server-owned (present in session.created/updated only).
    id: str | UnsetType = UNSET
    object: str | UnsetType = UNSET
    expires_at: int | UnsetType = UNSET


# ----------------------------------------------------------------------------- items


class ContentPart(_Model):
    """One part of a message: ``input_text``/``input_audio`` (user, system: input_text
    only) or ``output_text``/``output_audio`` (assistant). ``audio`` is base64."""

    type: Literal["input_text", "input_audio", "output_text", "output_audio", "input_image"]
    text: str | UnsetType = UNSET
    audio: str | UnsetType = UNSET
    transcript: str | None | UnsetType = UNSET
    image_url: str | UnsetType = UNSET


class MessageItem(_Model, tag_field="type", tag="message"):
    role: Literal["user", "assistant", "system"]
    content: list[ContentPart]
    id: str | UnsetType = UNSET
    object: Literal["realtime.item"] | UnsetType = UNSET
    status: Literal["completed", "incomplete", "in_progress"] | UnsetType = UNSET


class FunctionCallItem(_Model, tag_field="type", tag="function_call"):
    name: str
    arguments: str
    call_id: str | UnsetType = UNSET
    id: str | UnsetType = UNSET
    object: Literal["realtime.item"] | UnsetType = UNSET
    status: Literal["completed", "incomplete", "in_progress"] | UnsetType = UNSET


class FunctionCallOutputItem(_Model, tag_field="type", tag="function_call_output"):
    call_id: str
    output: str
    id: str | UnsetType = UNSET
    object: Literal["realtime.item"] | UnsetType = UNSET
    status: Literal["completed", "incomplete", "in_progress"] | UnsetType = UNSET


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


# ------------------------------------------------------------------------- responses


class ResponseCreateParams(_Model):
    output_modalities: list[Literal["text", "audio"]] | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    conversation: str | UnsetType = UNSET
    input: list[Item] | UnsetType = UNSET
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: str | ToolChoiceFunction | UnsetType = UNSET
    max_output_tokens: int | str | UnsetType = UNSET
    metadata: dict[str, str] | None | UnsetType = UNSET
    audio: dict[str, Any] | UnsetType = UNSET


class StatusDetails(_Reported):
    type: str | None = None
    reason: str | None = None
    error: dict[str, Any] | None = None


class Usage(_Reported):
    total_tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    input_token_details: dict[str, Any] | None = None
    output_token_details: dict[str, Any] | None = None


class Response(_Reported):
    id: str | None = None
    object: Literal["realtime.response"] = "realtime.response"
    status: Literal["completed", "cancelled", "failed", "incomplete", "in_progress"] | None = None
    status_details: StatusDetails | None = None
    output: list[Item] = []
    usage: Usage | None = None
    conversation_id: str | None = None
    output_modalities: list[str] | None = None
    max_output_tokens: int | str | None = None
    metadata: dict[str, str] | None = None
    audio: dict[str, Any] | None = None


class ResponsePart(_Reported):
    """The part in ``response.content_part.added/done`` (type ``audio`` or ``text``)."""

    type: Literal["audio", "text"]
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None


class ErrorDetail(_Reported):
    type: str
    message: str
    code: str | None = None
    param: str | None = None
    event_id: str | None = None


class RateLimit(_Reported):
    name: Literal["requests", "tokens"]
    limit: int
    remaining: int
    reset_seconds: float


class ConversationInfo(_Reported):
    id: str | None = None
    object: Literal["realtime.conversation"] = "realtime.conversation"


# ---------------------------------------------------------------------- client events


class _Client(
    msgspec.Struct,
    frozen=True,
    kw_only=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    tag_field="type",
):
    event_id: str | UnsetType = UNSET


class SessionUpdate(_Client, tag="session.update"):
    session: Session


class InputAudioBufferAppend(_Client, tag="input_audio_buffer.append", gc=False):
    audio: str  # base64, kept encoded


class InputAudioBufferCommit(_Client, tag="input_audio_buffer.commit"):
    pass


class InputAudioBufferClear(_Client, tag="input_audio_buffer.clear"):
    pass


class ConversationItemCreate(_Client, tag="conversation.item.create"):
    item: Item
    previous_item_id: str | None | UnsetType = UNSET


class ConversationItemRetrieve(_Client, tag="conversation.item.retrieve"):
    item_id: str


class ConversationItemTruncate(_Client, tag="conversation.item.truncate"):
    item_id: str
    content_index: int
    audio_end_ms: int


class ConversationItemDelete(_Client, tag="conversation.item.delete"):
    item_id: str


class ResponseCreate(_Client, tag="response.create"):
    response: ResponseCreateParams | UnsetType = UNSET


class ResponseCancel(_Client, tag="response.cancel"):
    response_id: str | UnsetType = UNSET


class OutputAudioBufferClear(_Client, tag="output_audio_buffer.clear"):
    pass


ClientEvent = (
    SessionUpdate
    | InputAudioBufferAppend
    | InputAudioBufferCommit
    | InputAudioBufferClear
    | ConversationItemCreate
    | ConversationItemRetrieve
    | ConversationItemTruncate
    | ConversationItemDelete
    | ResponseCreate
    | ResponseCancel
    | OutputAudioBufferClear
)


# ---------------------------------------------------------------------- server events


class _Server(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    # Required on the wire; a sender fills it in just before encoding.
    event_id: str = ""


class ErrorEvent(_Server, tag="error"):
    error: ErrorDetail


class SessionCreated(_Server, tag="session.created"):
    session: Session


class SessionUpdated(_Server, tag="session.updated"):
    session: Session


class ConversationCreated(_Server, tag="conversation.created"):
    conversation: ConversationInfo


class ConversationItemCreated(_Server, tag="conversation.item.created"):
    item: Item
    previous_item_id: str | None = None


class ConversationItemAdded(_Server, tag="conversation.item.added"):
    item: Item
    previous_item_id: str | None = None


class ConversationItemDone(_Server, tag="conversation.item.done"):
    item: Item
    previous_item_id: str | None = None


class ConversationItemRetrieved(_Server, tag="conversation.item.retrieved"):
    item: Item


class ConversationItemTruncated(_Server, tag="conversation.item.truncated"):
    item_id: str
    content_index: int
    audio_end_ms: int


class ConversationItemDeleted(_Server, tag="conversation.item.deleted"):
    item_id: str


class InputAudioTranscriptionDelta(
    _Server, tag="conversation.item.input_audio_transcription.delta"
):
    item_id: str
    content_index: int = 0
    delta: str = ""


class InputAudioTranscriptionCompleted(
    _Server, tag="conversation.item.input_audio_transcription.completed"
):
    item_id: str
    content_index: int
    transcript: str
    usage: dict[str, Any]


class InputAudioTranscriptionFailed(
    _Server, tag="conversation.item.input_audio_transcription.failed"
):
    item_id: str
    content_index: int
    error: dict[str, Any]


class InputAudioBufferCommitted(_Server, tag="input_audio_buffer.committed"):
    item_id: str
    previous_item_id: str | None = None


class InputAudioBufferCleared(_Server, tag="input_audio_buffer.cleared"):
    pass


class InputAudioBufferSpeechStarted(_Server, tag="input_audio_buffer.speech_started"):
    audio_start_ms: int
    item_id: str


class InputAudioBufferSpeechStopped(_Server, tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int
    item_id: str


class InputAudioBufferTimeoutTriggered(_Server, tag="input_audio_buffer.timeout_triggered"):
    audio_start_ms: int
    audio_end_ms: int
    item_id: str


class OutputAudioBufferStarted(_Server, tag="output_audio_buffer.started"):
    response_id: str


class OutputAudioBufferStopped(_Server, tag="output_audio_buffer.stopped"):
    response_id: str


class OutputAudioBufferCleared(_Server, tag="output_audio_buffer.cleared"):
    response_id: str


class ResponseCreated(_Server, tag="response.created"):
    response: Response


class ResponseDone(_Server, tag="response.done"):
    response: Response


class ResponseOutputItemAdded(_Server, tag="response.output_item.added"):
    response_id: str
    output_index: int
    item: Item


class ResponseOutputItemDone(_Server, tag="response.output_item.done"):
    response_id: str
    output_index: int
    item: Item


class ResponseContentPartAdded(_Server, tag="response.content_part.added"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: ResponsePart


class ResponseContentPartDone(_Server, tag="response.content_part.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: ResponsePart


class ResponseOutputTextDelta(_Server, tag="response.output_text.delta"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ResponseOutputTextDone(_Server, tag="response.output_text.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    text: str


class ResponseOutputAudioDelta(_Server, tag="response.output_audio.delta", gc=False):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str  # base64, kept encoded


class ResponseOutputAudioDone(_Server, tag="response.output_audio.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int


class ResponseOutputAudioTranscriptDelta(_Server, tag="response.output_audio_transcript.delta"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ResponseOutputAudioTranscriptDone(_Server, tag="response.output_audio_transcript.done"):
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    transcript: str


class ResponseFunctionCallArgumentsDelta(_Server, tag="response.function_call_arguments.delta"):
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    delta: str


class ResponseFunctionCallArgumentsDone(_Server, tag="response.function_call_arguments.done"):
    response_id: str
    item_id: str
    output_index: int
    call_id: str
    name: str
    arguments: str


class RateLimitsUpdated(_Server, tag="rate_limits.updated"):
    rate_limits: list[RateLimit]


ServerEvent = (
    ErrorEvent
    | SessionCreated
    | SessionUpdated
    | ConversationCreated
    | ConversationItemCreated
    | ConversationItemAdded
    | ConversationItemDone
    | ConversationItemRetrieved
    | ConversationItemTruncated
    | ConversationItemDeleted
    | InputAudioTranscriptionDelta
    | InputAudioTranscriptionCompleted
    | InputAudioTranscriptionFailed
    | InputAudioBufferCommitted
    | InputAudioBufferCleared
    | InputAudioBufferSpeechStarted
    | InputAudioBufferSpeechStopped
    | InputAudioBufferTimeoutTriggered
    | OutputAudioBufferStarted
    | OutputAudioBufferStopped
    | OutputAudioBufferCleared
    | ResponseCreated
    | ResponseDone
    | ResponseOutputItemAdded
    | ResponseOutputItemDone
    | ResponseContentPartAdded
    | ResponseContentPartDone
    | ResponseOutputTextDelta
    | ResponseOutputTextDone
    | ResponseOutputAudioDelta
    | ResponseOutputAudioDone
    | ResponseOutputAudioTranscriptDelta
    | ResponseOutputAudioTranscriptDone
    | ResponseFunctionCallArgumentsDelta
    | ResponseFunctionCallArgumentsDone
    | RateLimitsUpdated
)


class UnknownServerEvent(msgspec.Struct, frozen=True):
    """A server event whose ``type`` this module does not know (a newer API, MCP events):
    passed through as the decoded object so a relay can forward or log it."""

    type: str
    raw: dict[str, Any]


# Beta names (renamed in GA); never produced, never a tag here.
BETA_EVENT_NAMES: frozenset[str] = frozenset(
    {
        "response.audio.delta",
        "response.audio.done",
        "response.text.delta",
        "response.text.done",
        "response.audio_transcript.delta",
        "response.audio_transcript.done",
    }
)


def _tags(union: Any) -> dict[str, type]:
    return {
        msgspec.inspect.type_info(t).tag: t  # type: ignore[attr-defined]
        for t in union.__args__
    }


def client_event_types() -> dict[str, type]:
    """Map of client event ``type`` to its Struct (all 11)."""
    return _tags(ClientEvent)


def server_event_types() -> dict[str, type]:
    """Map of server event ``type`` to its Struct (the ones decoded to a typed event)."""
    return _tags(ServerEvent)
