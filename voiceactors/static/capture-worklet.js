// Microphone capture on the audio thread: mono float at the context's rate in, 20 ms PCM16
// frames at 24 kHz out (posted to the main thread, buffer transferred, never copied twice).
//
// The node is created with channelCount 1 / "explicit", so the browser has already mixed
// the microphone down to mono. When the browser would not give us a 24 kHz context the
// Resampler converts here, before the samples ever reach the main thread.

import { Resampler, floatToPcm16 } from "./resample.js";

class CaptureProcessor extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = options.processorOptions || {};
    this.targetRate = opts.targetRate || 24000;
    this.frameSamples = Math.round((this.targetRate * (opts.frameMs || 20)) / 1000);
    this.resampler = new Resampler(sampleRate, this.targetRate);
    this.frame = new Float32Array(this.frameSamples);
    this.fill = 0;
    this.stopped = false;
    // "stop" ends processing for good: returning false lets the browser collect the node.
    this.port.onmessage = (e) => {
      if (e.data && e.data.type === "stop") this.stopped = true;
    };
  }

  process(inputs) {
    if (this.stopped) return false;
    const channel = inputs[0] && inputs[0][0];
    if (!channel) return true; // no input connected yet (or the track ended): keep waiting
    const samples = this.resampler.process(channel);
    for (let i = 0; i < samples.length; i++) {
      this.frame[this.fill++] = samples[i];
      if (this.fill === this.frameSamples) this.flush();
    }
    return true;
  }

  flush() {
    let energy = 0;
    for (let i = 0; i < this.fill; i++) energy += this.frame[i] * this.frame[i];
    const pcm = floatToPcm16(this.frame);
    // Level in dBFS (RMS), for the page's input meter.
    const level = 10 * Math.log10(energy / this.fill + 1e-12);
    this.port.postMessage({ type: "frame", pcm: pcm.buffer, level }, [pcm.buffer]);
    this.fill = 0;
  }
}

registerProcessor("voiceactors-capture", CaptureProcessor);
