// Agent audio playback on the audio thread: a ring of 24 kHz PCM16, played out at the
// context's rate, that knows how much of each item has been played and drops everything
// at once on "clear".
//
// Positions are absolute counts of 24 kHz source samples since the node was made:
// `written` (pushed), `consumed` (taken out of the ring into the resampler) and `pos`
// (actually rendered). `pos` is what the server's truncation needs: audio that only sat
// in a buffer was never heard. With resampling, a few output samples wait in `pending`
// between the ring and the speaker; `pos` accounts for them.
//
// Why the ring holds ~44 s: the bare Realtime API and the simulator send a whole response
// faster than real time. The gateway paces audio with a bounded lead, so through it the
// ring stays nearly empty. When it is full anyway, the newest audio is dropped and
// counted in `overflow` (dropping the oldest would skip audio in the middle of a sentence).
//
// Messages in:  {type: "push", itemId, pcm: ArrayBuffer}   PCM16 24 kHz mono (LE)
//               {type: "clear"}                            drop all buffered audio now
//               {type: "streaming", on: bool}              a response is (no longer) running
// Messages out: {type: "started", itemId}                  first sample of an item rendered
//               {type: "status", ...}                      every ~50 ms while playing, and
//                                                          once when playback runs dry
//               {type: "cleared", ...}                     answer to "clear"

import { Resampler } from "./resample.js";

const SOURCE_RATE = 24000;
const CAPACITY = 1 << 20; // source samples (power of two: indices wrap with a mask)
const MASK = CAPACITY - 1;
const CHUNK = 256; // source samples moved from ring to resampler at a time
const MAX_SEGMENTS = 64; // queued (item, span) records; more means a misbehaving server
const STATUS_EVERY_S = 0.05;

class PlaybackProcessor extends AudioWorkletProcessor {
  constructor() {
    super();
    this.ring = new Int16Array(CAPACITY);
    this.written = 0;
    this.consumed = 0;
    this.pos = 0;
    this.resampler = new Resampler(SOURCE_RATE, sampleRate);
    this.ratio = SOURCE_RATE / sampleRate; // source samples per output sample
    this.chunk = new Float32Array(CHUNK);
    this.pending = new Float32Array(0);
    this.pendingAt = 0;
    // Spans of the ring by item: {itemId, start, end, offset (item audio before start)}.
    this.segments = [];
    this.announced = null; // last item whose first sample was rendered
    this.streaming = false;
    this.starved = false;
    this.playing = false;
    this.samplesPlayed = 0; // total source samples rendered
    this.framesPlayed = 0; // render quanta (128 frames) that carried agent audio
    this.underruns = 0;
    this.overflow = 0;
    this.nextStatus = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(msg) {
    switch (msg && msg.type) {
      case "push":
        this.push(String(msg.itemId || ""), new Int16Array(msg.pcm));
        break;
      case "clear":
        this.clear();
        break;
      case "streaming":
        this.streaming = Boolean(msg.on);
        if (this.streaming) this.starved = false;
        break;
    }
  }

  push(itemId, pcm) {
    const free = CAPACITY - (this.written - this.consumed);
    let n = Math.min(pcm.length, free);
    const last = this.segments[this.segments.length - 1];
    const extend = last && last.itemId === itemId && last.end === this.written;
    if (!extend && this.segments.length >= MAX_SEGMENTS) n = 0;
    this.overflow += pcm.length - n;
    if (n === 0) return;
    if (extend) {
      last.end += n;
    } else {
      let offset = 0;
      for (const s of this.segments) if (s.itemId === itemId) offset += s.end - s.start;
      this.segments.push({ itemId, start: this.written, end: this.written + n, offset });
    }
    const at = this.written & MASK;
    const first = Math.min(n, CAPACITY - at);
    this.ring.set(pcm.subarray(0, first), at);
    if (first < n) this.ring.set(pcm.subarray(first, n), 0);
    this.written += n;
  }

  clear() {
    const where = this.position();
    const dropped = this.written - this.pos;
    this.consumed = this.written;
    this.pos = this.written;
    this.pending = new Float32Array(0);
    this.pendingAt = 0;
    this.resampler.reset();
    this.segments = [];
    this.playing = false;
    this.starved = false;
    this.port.postMessage({ type: "cleared", ...where, dropped, ...this.counters() });
  }

  /** The item under the play head and how far into it we are (source samples). */
  position() {
    let seg = null;
    for (const s of this.segments) {
      if (s.start < this.pos || seg === null) seg = s;
      if (s.end > this.pos) break;
    }
    if (seg === null) return { itemId: null, itemPlayed: 0 };
    const into = Math.min(Math.max(this.pos - seg.start, 0), seg.end - seg.start);
    return { itemId: seg.itemId, itemPlayed: seg.offset + into };
  }

  counters() {
    return {
      samplesPlayed: this.samplesPlayed,
      framesPlayed: this.framesPlayed,
      depth: this.written - this.pos,
      underruns: this.underruns,
      overflow: this.overflow,
    };
  }

  process(_inputs, outputs) {
    const out = outputs[0][0];
    let k = 0;
    while (k < out.length) {
      if (this.pendingAt < this.pending.length) {
        const n = Math.min(out.length - k, this.pending.length - this.pendingAt);
        out.set(this.pending.subarray(this.pendingAt, this.pendingAt + n), k);
        this.pendingAt += n;
        k += n;
        continue;
      }
      const avail = this.written - this.consumed;
      if (avail === 0) break;
      const take = Math.min(avail, CHUNK);
      const chunk = take === CHUNK ? this.chunk : new Float32Array(take);
      for (let i = 0; i < take; i++) chunk[i] = this.ring[(this.consumed + i) & MASK] / 32768;
      this.consumed += take;
      // Passthrough returns `chunk` itself; it is refilled only once fully rendered.
      this.pending = this.resampler.process(chunk);
      this.pendingAt = 0;
    }
    out.fill(0, k);
    if (k > 0) this.advance();
    else if (this.playing) this.runDry();
    return true;
  }

  advance() {
    const left = this.pending.length - this.pendingAt;
    let pos = this.consumed - left * this.ratio;
    if (left === 0 && this.consumed === this.written) pos = this.written; // exact when drained
    pos = Math.min(Math.max(pos, this.pos), this.written);
    this.samplesPlayed += pos - this.pos;
    this.pos = pos;
    this.framesPlayed += 1;
    this.playing = true;
    this.starved = false;
    this.announce();
    if (currentTime >= this.nextStatus) {
      this.nextStatus = currentTime + STATUS_EVERY_S;
      this.port.postMessage({ type: "status", ...this.position(), ...this.counters() });
    }
    this.forget();
  }

  runDry() {
    // Out of audio: an underrun if the response is still streaming, the end otherwise.
    if (this.streaming && !this.starved) {
      this.starved = true;
      this.underruns += 1;
    }
    this.playing = false;
    this.port.postMessage({ type: "status", ...this.position(), ...this.counters(), dry: true });
  }

  announce() {
    for (const s of this.segments) {
      if (s.start >= this.pos) break;
      if (s.itemId !== this.announced && s.offset === 0) {
        this.announced = s.itemId;
        this.port.postMessage({ type: "started", itemId: s.itemId });
      }
    }
  }

  forget() {
    // Drop fully played spans, keeping the last one so `position()` can still name the item.
    while (this.segments.length > 1 && this.segments[0].end <= this.pos) this.segments.shift();
  }
}

registerProcessor("voiceactors-playback", PlaybackProcessor);
