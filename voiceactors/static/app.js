// The voiceactors browser client: microphone -> 20 ms PCM16 frames -> WebSocket; agent audio
// -> playback worklet; conversation state, transcripts and latency on the page.
//
// URL parameters:
//   ?token=T   authenticate with subprotocols ["realtime", "openai-insecure-api-key.T"]
//   ?ws=URL    WebSocket URL (default: same origin, /v1/realtime)
//   ?model=M   model query parameter added when the URL has none (default gpt-realtime)
//   ?rate=HZ   ask for an AudioContext at HZ instead of 24000 (tests the resampling path)
//   ?transcribe=0      do not ask for input transcription in session.update
//   ?flush_on_speech=1|0  force (1) or forbid (0) dropping agent audio on the server's
//       speech_started; by default the session decides (below).
//
// Who stops the agent's voice when the user talks over it. The server's session says it:
// - turn_detection.interrupt_response true (the Realtime API's default; the bare
//   simulator): the server cancels the response itself on speech_started and a WebSocket
//   client is expected to stop playing then. The page flushes on speech_started.
// - interrupt_response false (the voiceactors gateway, whose turn machine decides): the
//   page keeps playing through speech_started, because the gateway may only pause and then
//   resume after a cough (a false interruption), which a local flush would cut off. When it
//   does decide to interrupt, it sends the GA event output_audio_buffer.cleared, and the
//   page drops what it buffered at once.
// output_audio_buffer.cleared is obeyed whatever the session says. Until the first
// session event the page assumes the API's default (flush on speech_started).
//
// Counters for tests and the curious live on window.voiceactors (see `stats`).

const params = new URLSearchParams(location.search);
const WIRE_RATE = 24000; // the Realtime API's PCM16 rate, both directions
const FRAME_MS = 20;
const REPORT_EVERY_MS = 100; // voiceactors.playback cadence while playing
const MAX_BUFFERED_BYTES = 256 * 1024; // socket backlog (~2.7 s of audio) before frames drop
const MAX_EVENTS = 500;
const MAX_LATENCIES = 100;
const MAX_LINES = 100;
const MAX_ERRORS = 20;
const MAX_CLEARED = 32;
const SENT_LOG = 1024; // send times of the last frames (~20 s): where speech really ended
const MAX_SILENCE_MS = 10000; // a speech end further back than this is not believed

const LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

const STATE_LABELS = {
  idle: "Idle",
  connecting: "Connecting…",
  listening: "Listening",
  user_speaking: "You are speaking",
  thinking: "Agent thinking",
  agent_speaking: "Agent speaking",
  interrupted: "Interrupted",
  closed: "Closed",
};

/** Everything a test may read. Arrays are bounded (oldest dropped). */
const stats = {
  state: "idle",
  framesSent: 0,
  framesDropped: 0, // captured frames not sent because the socket was backed up
  framesPlayed: 0, // render quanta (128 samples at the context rate) carrying agent audio
  samplesPlayed: 0, // agent audio rendered, in 24 kHz samples
  underruns: 0, // playback ran dry while a response was still streaming
  overflow: 0, // agent samples dropped because the playback ring was full
  bufferMs: 0, // agent audio buffered, not yet rendered
  latencies: [], // ms, end of the user's speech -> first agent audio at the speaker
  events: [], // types of server events received, in order
  errors: [], // {code, message} of server `error` events and local failures
  sampleRate: null, // the AudioContext's rate
  playbackReports: true, // false once the server refused voiceactors.playback
  reportsSent: 0,
  lastReport: null, // {item_id, played_ms} last sent
  droppedOnClear: 0, // agent samples flushed unplayed
  clears: 0, // local playback flushes (output_audio_buffer.cleared or speech_started)
  flushOnSpeech: true, // the rule in force (see the top of this file)
  responding: false, // a response is running (response.created, no response.done yet)
  cancelled: 0, // responses that ended with status "cancelled"
  closeCode: null,
};
window.voiceactors = stats;

const $ = (id) => document.getElementById(id);
const ui = {
  state: $("state"),
  toggle: $("toggle"),
  level: $("level"),
  error: $("error"),
  latencyLast: $("latency-last"),
  latencyMedian: $("latency-median"),
  buffer: $("buffer"),
  framesSent: $("frames-sent"),
  framesPlayed: $("frames-played"),
  underruns: $("underruns"),
  clears: $("clears"),
  rate: $("rate"),
  transcript: $("transcript"),
};

function push(list, value, cap) {
  list.push(value);
  if (list.length > cap) list.splice(0, list.length - cap);
}

function setState(state) {
  stats.state = state;
  ui.state.dataset.state = state;
  ui.state.textContent = STATE_LABELS[state] || state;
  render();
}

function showError(code, message) {
  push(stats.errors, { code, message }, MAX_ERRORS);
  ui.error.textContent = message;
  ui.error.hidden = false;
}

// ---------------------------------------------------------------------------- wire helpers

function socketUrl() {
  const explicit = params.get("ws");
  const url = new URL(
    explicit || "/v1/realtime",
    `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}`,
  );
  if (!url.searchParams.has("model")) {
    url.searchParams.set("model", params.get("model") || "gpt-realtime");
  }
  return url.toString();
}

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

/** PCM16 LE base64 -> Int16Array; throws on bad base64 or an odd byte count. */
function pcmFromBase64(b64) {
  const s = atob(b64);
  if (s.length % 2) throw new Error(`odd PCM16 byte count ${s.length}`);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  if (!LITTLE_ENDIAN) swapBytes(bytes);
  return new Int16Array(bytes.buffer);
}

function swapBytes(bytes) {
  for (let i = 0; i + 1 < bytes.length; i += 2) {
    const t = bytes[i];
    bytes[i] = bytes[i + 1];
    bytes[i + 1] = t;
  }
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

// ---------------------------------------------------------------------------- one call

class Call {
  constructor() {
    this.ws = null;
    this.ctx = null;
    this.stream = null;
    this.capture = null;
    this.player = null;
    this.closed = false;
    this.stoppedAt = null; // performance.now() when the user's last speech ended
    this.sent = 0; // frames sent in this call: the server's audio clock, in FRAME_MS
    this.sentAt = new Float64Array(SENT_LOG); // performance.now() of frame i at i % SENT_LOG
    this.silenceMs = 0; // the server VAD's silence window: speech_stopped's audio includes it
    this.audible = false; // agent audio is buffered or playing
    this.responding = false; // between response.created and response.done
    this.userOverAgent = false; // the user started speaking while the agent was audible
    this.lastAudioItem = null;
    this.cleared = []; // items flushed locally: their late deltas are ignored
    this.lastReportAt = -Infinity;
    this.lines = new Map(); // item_id -> <li>
    this.forcedFlush = params.has("flush_on_speech") ? params.get("flush_on_speech") === "1" : null;
    stats.flushOnSpeech = this.forcedFlush ?? true;
    stats.responding = false;
  }

  /** Open audio then the socket. Throws (after closing what it opened) on any failure. */
  async start() {
    setState("connecting");
    try {
      await this.openAudio();
      await this.openSocket();
    } catch (err) {
      this.close();
      throw err;
    }
  }

  async openAudio() {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: {
        channelCount: 1,
        echoCancellation: true, // the agent's voice from the speakers is not the user
        noiseSuppression: true,
        autoGainControl: true,
      },
    });
    const wanted = Number(params.get("rate")) || WIRE_RATE;
    let source;
    try {
      this.ctx = new AudioContext({ sampleRate: wanted, latencyHint: "interactive" });
      source = this.ctx.createMediaStreamSource(this.stream);
    } catch (err) {
      // Some browsers refuse the rate, or refuse a microphone at another rate than the
      // device's: take the native rate and let the worklets resample.
      if (this.ctx) await this.ctx.close();
      this.ctx = new AudioContext({ latencyHint: "interactive" });
      source = this.ctx.createMediaStreamSource(this.stream);
    }
    stats.sampleRate = this.ctx.sampleRate;
    await this.ctx.audioWorklet.addModule(new URL("./capture-worklet.js", import.meta.url));
    await this.ctx.audioWorklet.addModule(new URL("./playback-worklet.js", import.meta.url));
    this.capture = new AudioWorkletNode(this.ctx, "voiceactors-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 0,
      channelCount: 1,
      channelCountMode: "explicit",
      channelInterpretation: "speakers",
      processorOptions: { targetRate: WIRE_RATE, frameMs: FRAME_MS },
    });
    this.capture.port.onmessage = (e) => this.onFrame(e.data);
    this.player = new AudioWorkletNode(this.ctx, "voiceactors-playback", {
      numberOfInputs: 0,
      numberOfOutputs: 1,
      outputChannelCount: [1],
    });
    this.player.port.onmessage = (e) => this.onPlayer(e.data);
    this.player.connect(this.ctx.destination);
    source.connect(this.capture);
    await this.ctx.resume();
  }

  openSocket() {
    const token = params.get("token");
    const protocols = token ? ["realtime", `openai-insecure-api-key.${token}`] : undefined;
    this.ws = new WebSocket(socketUrl(), protocols);
    this.ws.onmessage = (e) => this.onMessage(e.data);
    this.ws.onclose = (e) => this.onClose(e);
    return new Promise((resolve, reject) => {
      this.ws.onopen = () => {
        if (params.get("transcribe") !== "0") {
          const transcription = { model: "gpt-4o-transcribe" };
          this.send({
            type: "session.update",
            session: { type: "realtime", audio: { input: { transcription } } },
          });
        }
        resolve();
      };
      this.ws.onerror = () => reject(new Error(`cannot connect to ${socketUrl()}`));
    });
  }

  /** Idempotent: stops the microphone, closes the socket (1000) and the AudioContext. */
  close() {
    if (this.closed) return;
    this.closed = true;
    if (this.capture) this.capture.port.postMessage({ type: "stop" });
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "stopped");
    if (this.ctx) this.ctx.close();
  }

  send(event) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(event));
  }

  // -- microphone -> socket

  onFrame(msg) {
    if (msg.type !== "frame") return;
    ui.level.value = Math.max(-60, msg.level);
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    // A backed-up socket means the network is slower than real time: drop rather than let
    // the browser queue grow without bound; the counter says so.
    if (this.ws.bufferedAmount > MAX_BUFFERED_BYTES) {
      stats.framesDropped += 1;
      return;
    }
    this.send({ type: "input_audio_buffer.append", audio: toBase64(new Uint8Array(msg.pcm)) });
    this.sentAt[this.sent % SENT_LOG] = performance.now();
    this.sent += 1;
    stats.framesSent += 1;
  }

  // -- socket -> page

  onMessage(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      showError("bad_frame", "The server sent a frame that is not JSON.");
      return;
    }
    if (!event || typeof event.type !== "string") return;
    push(stats.events, event.type, MAX_EVENTS);
    switch (event.type) {
      case "session.created":
        this.onSession(event.session);
        setState("listening");
        break;
      case "session.updated":
        this.onSession(event.session);
        break;
      case "input_audio_buffer.speech_started":
        if (this.audible && stats.flushOnSpeech) {
          this.flush();
          setState("interrupted");
        } else {
          // Over the agent, a server that decides may hold its audio back while it does:
          // a ring that runs dry then is a pause, not an underrun.
          this.userOverAgent = this.audible;
          this.streaming();
          setState("user_speaking");
        }
        break;
      case "input_audio_buffer.speech_stopped":
        this.stoppedAt = this.speechEndedAt(event.audio_end_ms);
        this.userOverAgent = false;
        this.streaming();
        setState("thinking");
        break;
      case "output_audio_buffer.cleared": {
        const cut = this.audible || this.responding;
        this.flush();
        if (cut) setState("interrupted");
        break;
      }
      case "input_audio_buffer.committed":
        this.line(event.item_id, "user", "…");
        break;
      case "conversation.item.input_audio_transcription.completed":
        this.line(event.item_id, "user", event.transcript || "(no transcript)");
        break;
      case "response.created":
        this.responding = true;
        this.streaming();
        break;
      case "response.output_audio.delta":
        this.onAudio(event);
        break;
      case "response.output_audio_transcript.delta":
        this.appendLine(event.item_id, "agent", event.delta);
        break;
      case "response.output_audio_transcript.done":
        this.line(event.item_id, "agent", event.transcript);
        break;
      case "response.done":
        this.responding = false;
        this.streaming();
        if (event.response?.status === "cancelled") {
          stats.cancelled += 1;
          for (const item of event.response.output || []) this.cut(item.id);
        }
        if (!this.audible && stats.state === "thinking") setState("listening");
        break;
      case "conversation.item.truncated": // what the user did not hear is gone
        this.cut(event.item_id);
        break;
      case "error":
        this.onError(event.error || {});
        break;
    }
  }

  /**
   * When the user's speech ended, in page time, from speech_stopped's `audio_end_ms` (the
   * server's clock: ms of audio received this session, up to the end of the silence window
   * that ended the turn). The wait the user perceives starts there, a silence window
   * before the event arrives. Falls back to now when the server's clock cannot be matched
   * to the frames sent (frames dropped, a reconnect upstream, an old value).
   */
  speechEndedAt(audioEndMs) {
    const now = performance.now();
    if (!Number.isFinite(audioEndMs)) return now;
    const endMs = audioEndMs - this.silenceMs;
    const frame = Math.floor(endMs / FRAME_MS);
    if (frame < 0 || frame >= this.sent || frame < this.sent - SENT_LOG) return now;
    // Frame `frame` was sent once complete; the speech ended inside it.
    const at = this.sentAt[frame % SENT_LOG] - ((frame + 1) * FRAME_MS - endMs);
    return at <= now && now - at < MAX_SILENCE_MS ? at : now;
  }

  /** Follow the session's turn detection: see "who stops the agent's voice" above. */
  onSession(session) {
    const td = session?.audio?.input?.turn_detection;
    if (td === undefined) return; // not described: keep what was known
    // The API's server_vad default window is 500 ms; semantic_vad has none to subtract.
    this.silenceMs = td?.type === "server_vad" ? (td.silence_duration_ms ?? 500) : 0;
    if (this.forcedFlush === null) {
      stats.flushOnSpeech = td !== null && td.interrupt_response !== false;
    }
  }

  /** Tell the player whether more audio is due (its underrun count depends on it). */
  streaming() {
    stats.responding = this.responding;
    this.player.port.postMessage({ type: "streaming", on: this.responding && !this.userOverAgent });
  }

  onAudio(event) {
    if (this.cleared.includes(event.item_id)) return; // in flight when we flushed
    let pcm;
    try {
      pcm = pcmFromBase64(event.delta);
    } catch (err) {
      showError("bad_audio", `Bad agent audio: ${err.message}`);
      return;
    }
    this.lastAudioItem = event.item_id;
    this.audible = true;
    const msg = { type: "push", itemId: event.item_id, pcm: pcm.buffer };
    this.player.port.postMessage(msg, [pcm.buffer]);
  }

  onError(error) {
    const message = String(error.message || "error");
    // A server without the voiceactors extension (the bare API, the simulator) refuses the
    // playback report as an unknown event type: stop sending it.
    if (message.includes("voiceactors.playback")) {
      stats.playbackReports = false;
      return;
    }
    showError(error.code || error.type || "error", message);
  }

  onClose(e) {
    stats.closeCode = e.code;
    const ours = this.closed; // we closed it (Stop): the page is already idle
    this.close();
    if (ours) return;
    if (e.code !== 1000) showError("closed", `Connection closed (${e.code}) ${e.reason}`);
    setState("closed");
    if (call === this) {
      call = null;
      setButton(false);
    }
  }

  // -- playback

  flush() {
    stats.clears += 1;
    if (this.lastAudioItem !== null && !this.cleared.includes(this.lastAudioItem)) {
      push(this.cleared, this.lastAudioItem, MAX_CLEARED);
    }
    this.player.port.postMessage({ type: "clear" });
    this.audible = false;
  }

  onPlayer(msg) {
    stats.samplesPlayed = msg.samplesPlayed ?? stats.samplesPlayed;
    stats.framesPlayed = msg.framesPlayed ?? stats.framesPlayed;
    stats.underruns = msg.underruns ?? stats.underruns;
    stats.overflow = msg.overflow ?? stats.overflow;
    if (msg.depth !== undefined) stats.bufferMs = msg.depth / (WIRE_RATE / 1000);
    switch (msg.type) {
      case "started":
        if (this.stoppedAt !== null) {
          const out = (this.ctx.baseLatency || 0) + (this.ctx.outputLatency || 0);
          push(stats.latencies, performance.now() - this.stoppedAt + out * 1000, MAX_LATENCIES);
          this.stoppedAt = null;
        }
        if (stats.state !== "interrupted" && stats.state !== "user_speaking") {
          setState("agent_speaking");
        }
        break;
      case "status":
        this.report(msg.itemId, msg.itemPlayed, Boolean(msg.dry));
        if (msg.dry && msg.depth === 0) {
          this.audible = false;
          if (stats.state === "agent_speaking") setState("listening");
        }
        break;
      case "cleared":
        stats.droppedOnClear += msg.dropped;
        this.report(msg.itemId, msg.itemPlayed, true);
        break;
    }
  }

  /** Tell the server how much of `itemId` has been played (floor: never past the truth). */
  report(itemId, playedSamples, final) {
    if (!stats.playbackReports || !itemId) return;
    const now = performance.now();
    // Status arrives every ~50 ms: allow half of that early so the cadence stays ~100 ms.
    if (!final && now - this.lastReportAt < REPORT_EVERY_MS - 25) return;
    const played_ms = Math.floor(playedSamples / (WIRE_RATE / 1000));
    const last = stats.lastReport;
    if (last && last.item_id === itemId && last.played_ms === played_ms) return;
    this.lastReportAt = now;
    stats.lastReport = { item_id: itemId, played_ms };
    stats.reportsSent += 1;
    this.send({ type: "voiceactors.playback", item_id: itemId, played_ms });
  }

  // -- transcript

  /** Mark an agent line as cut short (cancelled or truncated). */
  cut(itemId) {
    this.lines.get(itemId)?.classList.add("cut");
  }

  appendLine(itemId, role, text) {
    this.line(itemId, role, (this.lines.get(itemId)?.dataset.text || "") + text);
  }

  line(itemId, role, text) {
    if (!itemId) return;
    let li = this.lines.get(itemId);
    if (!li) {
      li = document.createElement("li");
      li.className = role;
      ui.transcript.append(li);
      this.lines.set(itemId, li);
      while (ui.transcript.children.length > MAX_LINES) {
        const old = ui.transcript.firstElementChild;
        for (const [id, el] of this.lines) if (el === old) this.lines.delete(id);
        old.remove();
      }
    }
    li.dataset.text = text;
    li.textContent = text;
  }
}

// ---------------------------------------------------------------------------- page

let call = null;

function render() {
  const lat = stats.latencies;
  ui.latencyLast.textContent = lat.length ? `${Math.round(lat[lat.length - 1])} ms` : "–";
  ui.latencyMedian.textContent = lat.length ? `${Math.round(median(lat))} ms` : "–";
  ui.buffer.textContent = `${Math.round(stats.bufferMs)} ms`;
  ui.framesSent.textContent = String(stats.framesSent);
  const seconds = (stats.samplesPlayed / WIRE_RATE).toFixed(1);
  ui.framesPlayed.textContent = `${stats.framesPlayed} (${seconds} s)`;
  ui.underruns.textContent = String(stats.underruns);
  ui.clears.textContent = String(stats.clears);
  ui.rate.textContent = stats.sampleRate ? `${stats.sampleRate / 1000} kHz` : "–";
}

async function toggle() {
  if (call) {
    const c = call;
    call = null;
    c.close();
    setState("idle");
  } else {
    ui.error.hidden = true;
    ui.toggle.disabled = true;
    call = new Call();
    try {
      await call.start();
    } catch (err) {
      call = null;
      setState("idle");
      showError("start_failed", `Could not start: ${err.message}`);
      ui.toggle.disabled = false;
      return;
    }
    ui.toggle.disabled = false;
  }
  setButton(call !== null);
}

function setButton(on) {
  ui.toggle.setAttribute("aria-pressed", String(on));
  ui.toggle.setAttribute("aria-label", on ? "Stop conversation" : "Start conversation");
  ui.toggle.textContent = on ? "Stop" : "Start";
}

ui.toggle.addEventListener("click", toggle);
ui.toggle.disabled = false;
setInterval(render, 250);
setState("idle");
