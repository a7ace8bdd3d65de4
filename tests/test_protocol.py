"""Realtime GA protocol types and codecs: round trips, strictness, bad input classes."""

from __future__ import annotations

import base64
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import voiceactors.realtime as rt
from voiceactors.realtime import (
    BETA_EVENT_NAMES,
    ClientEventDecoder,
    ClientEventEncoder,
    ProtocolError,
    ServerEventDecoder,
    ServerEventEncoder,
    UnknownServerEvent,
    b64decode_strict,
    client_event_types,
    server_event_types,
)

CLIENT_EVENTS = [
    rt.SessionUpdate(
        event_id="e1",
        session=rt.Session(
            model="gpt-realtime",
            instructions="Be brief.",
            output_modalities=["audio"],
            audio=rt.AudioConfig(
                input=rt.AudioInput(
                    format=rt.AudioFormat(type="audio/pcm", rate=24000),
                    transcription=rt.Transcription(model="gpt-4o-mini-transcribe"),
                    noise_reduction=rt.NoiseReduction(type="near_field"),
                    turn_detection=rt.TurnDetection(
                        type="server_vad",
                        threshold=0.5,
                        prefix_padding_ms=300,
                        silence_duration_ms=500,
                        idle_timeout_ms=None,
                        create_response=True,
                        interrupt_response=True,
                    ),
                ),
                output=rt.AudioOutput(
                    format=rt.AudioFormat(type="audio/pcmu"), voice="marin", speed=1.1
                ),
            ),
            tools=[rt.FunctionTool(name="f", description="d", parameters={"type": "object"})],
            tool_choice="auto",
            max_output_tokens="inf",
            truncation="auto",
        ),
    ),
    rt.SessionUpdate(
        session=rt.Session(audio=rt.AudioConfig(input=rt.AudioInput(turn_detection=None)))
    ),
    rt.InputAudioBufferAppend(audio=base64.b64encode(b"\x01\x02" * 10).decode()),
    rt.InputAudioBufferCommit(event_id="c"),
    rt.InputAudioBufferClear(),
    rt.ConversationItemCreate(
        item=rt.MessageItem(role="user", content=[rt.ContentPart(type="input_text", text="hi")]),
        previous_item_id=None,
    ),
    rt.ConversationItemCreate(item=rt.FunctionCallOutputItem(call_id="call_1", output='{"ok":1}')),
    rt.ConversationItemCreate(item=rt.FunctionCallItem(name="f", arguments="{}", call_id="call_2")),
    rt.ConversationItemRetrieve(item_id="item_1"),
    rt.ConversationItemTruncate(item_id="item_1", content_index=0, audio_end_ms=1234),
    rt.ConversationItemDelete(item_id="item_1"),
    rt.ResponseCreate(),
    rt.ResponseCreate(
        response=rt.ResponseCreateParams(
            output_modalities=["text"],
            instructions="x",
            conversation="none",
            metadata={"k": "v"},
            tool_choice=rt.ToolChoiceFunction(name="f"),
        )
    ),
    rt.ResponseCancel(),
    rt.ResponseCancel(response_id="resp_1"),
    rt.OutputAudioBufferClear(),
]


@pytest.mark.parametrize("event", CLIENT_EVENTS, ids=lambda e: type(e).__name__)
def test_client_events_round_trip(event):
    data = ClientEventEncoder().encode(event)
    assert ClientEventDecoder().decode(data) == event
    assert ClientEventDecoder().decode(data.decode()) == event


def test_all_eleven_client_events_and_the_sdk_agrees():
    from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent

    def sdk_tags(union) -> set[str]:
        members = typing.get_args(typing.get_args(union)[0])
        return {typing.get_args(m.model_fields["type"].annotation)[0] for m in members}

    assert set(client_event_types()) == sdk_tags(RealtimeClientEvent)
    assert len({type(e) for e in CLIENT_EVENTS}) == 11
    assert set(server_event_types()) <= sdk_tags(RealtimeServerEvent)


def test_no_beta_name_is_a_tag():
    tags = set(client_event_types()) | set(server_event_types())
    assert not tags & BETA_EVENT_NAMES
    assert "response.output_audio.delta" in tags


def test_unset_is_omitted_and_null_is_kept():
    e = rt.SessionUpdate(
        session=rt.Session(audio=rt.AudioConfig(input=rt.AudioInput(turn_detection=None)))
    )
    assert ClientEventEncoder().encode(e) == (
        b'{"type":"session.update","session":{"type":"realtime","audio":{"input":{"turn_detection":null}}}}'
    )
    assert ClientEventEncoder().encode(rt.ResponseCreate()) == b'{"type":"response.create"}'


B = b'{"type":"conversation.item.truncate","item_id":"i","content_index":0,"audio_end_ms":'


@pytest.mark.parametrize(
    ("frame", "code", "param", "words"),
    [
        (b'{"type":"response.create"', "invalid_json", None, "truncated"),
        (b"[1, 2]", "invalid_json", None, "expected a JSON object, got list"),
        (b"42", "invalid_json", None, "got int"),
        (b"null", "invalid_json", None, "got null"),
        (b'"text"', "invalid_json", None, "got str"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json", None, "nested deeper than 64"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "invalid_json", None, "nested deeper"),
        (B + b"9" * 5000 + b"}", "invalid_json", None, "out of range"),
        (B + b"1e400}", "invalid_json", None, "out of range"),
        (
            b'{"type":"response.create","event_id":"\\ud800"}',
            "invalid_json",
            None,
            "lone UTF-16 surrogate",
        ),
        (B + b"NaN}", "invalid_json", None, "NaN and Infinity"),
        (B + b"Infinity}", "invalid_json", None, "NaN and Infinity"),
        (b'{"type":"response.cancel","event_id":"\xff"}', "invalid_json", None, "not UTF-8"),
        (
            b'{"type":"response.cancel","response_id":"a","response_id":"b"}',
            "invalid_json",
            None,
            "'response_id' appears more than once",
        ),
        (
            b'{"type":"input_audio_buffer.append","audio":"AAAA","audio":"BBBB"}',
            "invalid_json",
            None,
            "'audio' appears more than once",
        ),
        (
            b'{"type":"input_audio_buffer.append","type":"input_audio_buffer.append","audio":"AAAA"}',
            "invalid_json",
            None,
            "'type' appears more than once",
        ),
        (
            b'{"type":"input_audio_buffer.append","audio":"AAAA","\\u0061udio":"BBBB"}',
            "invalid_json",
            None,
            "'audio' appears more than once",
        ),
        (b'{"event_id":"x"}', "missing_required_parameter", "type", "'type'"),
        (b'{"type":5}', "invalid_type", "type", "expected a string"),
        (b'{"type":"response.audio.delta"}', "invalid_value", "type", "Supported values"),
        (b'{"type":"input_audio_buffer.append"}', "missing_required_parameter", "audio", "'audio'"),
        (
            b'{"type":"input_audio_buffer.append","audio":5}',
            "invalid_type",
            "audio",
            "expected a string, but got an integer",
        ),
        (
            b'{"type":"input_audio_buffer.append","audio":"AAAA","extra":1}',
            "unknown_parameter",
            "extra",
            "'extra'",
        ),
        (B + b'"5"}', "invalid_type", "audio_end_ms", "expected an integer, but got a string"),
        (
            b'{"type":"conversation.item.create","item":{"type":"function_call_output","output":"x"}}',
            "missing_required_parameter",
            "item.call_id",
            "'item.call_id'",
        ),
        (
            b'{"type":"conversation.item.create","item":{"type":"message","role":"robot","content":[]}}',
            "invalid_value",
            "item.role",
            "item.role",
        ),
        (
            b'{"type":"session.update","session":{"type":"realtime","audio":{"input":{"vad":1}}}}',
            "unknown_parameter",
            "session.audio.input.vad",
            "Unknown parameter",
        ),
        (
            b'{"type":"session.update","session":{"type":"realtime","tools":[{"type":"function","name":"f","strict":true}]}}',
            "unknown_parameter",
            "session.tools[0].strict",
            "Unknown parameter",
        ),
        (
            b'{"type":"session.update","session":{"model":"gpt-realtime"}}',
            "missing_required_parameter",
            "session.type",
            "'session.type'",
        ),
        (
            b'{"type":"session.update","session":{"type":"transcription"}}',
            "invalid_value",
            "session.type",
            "session.type",
        ),
    ],
)
def test_bad_client_frames_raise_precise_protocol_errors(frame, code, param, words):
    with pytest.raises(ProtocolError) as err:
        ClientEventDecoder().decode(frame)
    assert (err.value.code, err.value.param) == (code, param)
    assert words in err.value.message
    assert err.value.type == "invalid_request_error"


def test_error_echoes_the_event_id():
    with pytest.raises(ProtocolError) as err:
        ClientEventDecoder().decode(b'{"type":"conversation.item.delete","event_id":"evt_7"}')
    assert err.value.event_id == "evt_7"


def test_text_frame_with_a_lone_surrogate_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="lone surrogate"):
        ClientEventDecoder().decode('{"type":"response.cancel","event_id":"\ud800"}')


@pytest.mark.parametrize(
    ("s", "why"),
    [
        ("AAAA AAAA", "whitespace"),
        ("AAAA\n", "whitespace"),
        ("ab-_", "URL-safe"),
        ("AA*A", "outside the base64 alphabet"),
        ("AAA", "not a multiple of 4"),
        ("AA=A", "padding"),
        ("AAAA====", "padding"),
        ("é", "outside the base64 alphabet"),
    ],
)
def test_b64decode_strict_rejects_what_b64decode_would_guess(s, why):
    with pytest.raises(ProtocolError) as err:
        b64decode_strict(s)
    assert why in err.value.message and err.value.param == "audio"
    assert err.value.code == "invalid_value"


def test_b64decode_strict_accepts_standard_base64():
    data = bytes(range(256))
    assert b64decode_strict(base64.b64encode(data).decode()) == data
    assert b64decode_strict("") == b""


def test_unknown_server_types_pass_through_and_are_counted():
    d = ServerEventDecoder()
    a = d.decode(b'{"type":"mcp_list_tools.in_progress","event_id":"e","item_id":"i"}')
    b = d.decode('{"type":"response.brand_new","event_id":"f"}')
    c = d.decode(b'{"type":"response.brand_new","event_id":"g"}')
    assert isinstance(a, UnknownServerEvent) and a.raw["item_id"] == "i"
    assert isinstance(b, UnknownServerEvent) and b.type == c.type == "response.brand_new"
    assert d.unknown_count == 3
    assert d.unknown_types == {"mcp_list_tools.in_progress": 1, "response.brand_new": 2}


def test_server_decoder_is_lenient_on_fields_strict_on_shape():
    d = ServerEventDecoder()
    e = d.decode(
        b'{"type":"input_audio_buffer.speech_started","event_id":"e","audio_start_ms":200,'
        b'"item_id":"i","new_field":{"x":1}}'
    )
    assert e == rt.InputAudioBufferSpeechStarted(event_id="e", audio_start_ms=200, item_id="i")
    with pytest.raises(ProtocolError) as err:
        d.decode(b'{"type":"input_audio_buffer.speech_started","event_id":"e","item_id":"i"}')
    assert err.value.param == "audio_start_ms"
    with pytest.raises(ProtocolError):
        d.decode(b'{"type":"error"' + b"[" * 1000)


def test_server_events_round_trip_with_nulls_kept():
    enc, dec = ServerEventEncoder(), ServerEventDecoder()
    events = [
        rt.ErrorEvent(
            event_id="e", error=rt.ErrorDetail(type="invalid_request_error", message="m", code="c")
        ),
        rt.InputAudioBufferCommitted(event_id="e", item_id="i"),
        rt.ResponseOutputAudioDelta(
            event_id="e",
            response_id="r",
            item_id="i",
            output_index=0,
            content_index=0,
            delta="AAAA",
        ),
        rt.ResponseDone(
            event_id="e",
            response=rt.Response(
                id="r",
                status="cancelled",
                status_details=rt.StatusDetails(type="cancelled", reason="client_cancelled"),
                output=[rt.FunctionCallItem(name="f", arguments="{}", call_id="c")],
                usage=rt.Usage(total_tokens=3),
            ),
        ),
        rt.RateLimitsUpdated(
            event_id="e",
            rate_limits=[rt.RateLimit(name="tokens", limit=1, remaining=0, reset_seconds=0.5)],
        ),
    ]
    for e in events:
        data = enc.encode(e)
        assert dec.decode(data) == e
    assert b'"previous_item_id":null' in enc.encode(events[1])


# ------------------------------------------------------------------------ properties

text = st.text(max_size=40)
ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_", min_size=1, max_size=24)


@settings(max_examples=200)
@given(audio=st.binary(max_size=2000), event_id=st.one_of(st.none(), text))
def test_append_round_trips(audio, event_id):
    e = rt.InputAudioBufferAppend(
        audio=base64.b64encode(audio).decode(),
        **({} if event_id is None else {"event_id": event_id}),
    )
    got = ClientEventDecoder().decode(ClientEventEncoder().encode(e))
    assert got == e
    assert b64decode_strict(got.audio) == audio


@settings(max_examples=200)
@given(item_id=ids, content_index=st.integers(0, 10), ms=st.integers(0, 2**53))
def test_truncate_round_trips(item_id, content_index, ms):
    e = rt.ConversationItemTruncate(item_id=item_id, content_index=content_index, audio_end_ms=ms)
    assert ClientEventDecoder().decode(ClientEventEncoder().encode(e)) == e


@settings(max_examples=200)
@given(
    instructions=st.one_of(st.just(msgspec.UNSET), text),
    threshold=st.one_of(st.just(msgspec.UNSET), st.floats(0, 1)),
    silence=st.one_of(st.just(msgspec.UNSET), st.integers(0, 5000)),
    vad_off=st.booleans(),
    tools=st.lists(st.builds(rt.FunctionTool, name=ids, description=text), max_size=3),
)
def test_session_update_round_trips(instructions, threshold, silence, vad_off, tools):
    td = (
        None
        if vad_off
        else rt.TurnDetection(type="server_vad", threshold=threshold, silence_duration_ms=silence)
    )
    e = rt.SessionUpdate(
        session=rt.Session(
            instructions=instructions,
            tools=tools,
            audio=rt.AudioConfig(input=rt.AudioInput(turn_detection=td)),
        )
    )
    assert ClientEventDecoder().decode(ClientEventEncoder().encode(e)) == e


@settings(max_examples=200)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoders(data):
    for decoder in (ClientEventDecoder(), ServerEventDecoder()):
        try:
            decoder.decode(data)
        except ProtocolError:
            pass


def test_exports():
    for name in rt.__all__:
        assert getattr(rt, name) is not None
