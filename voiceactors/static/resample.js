// Streaming sample-rate conversion for the audio worklets (and nothing else: no DOM, no I/O).
//
// Linear interpolation between input samples, preceded, when the rate goes down, by a short
// windowed-sinc low-pass so that what cannot exist at the output rate (above its Nyquist
// frequency) is removed instead of folding back as aliasing. 32 taps cost ~1.5 M
// multiply-adds per second at 48 kHz: nothing for an audio thread.
//
// State carries across calls, so feeding a signal in blocks of any size gives the same
// output as feeding it at once. The filter delays the signal by (taps - 1) / 2 input
// samples (0.3 ms at 48 kHz).

const TAPS = 32;

/** Blackman-windowed sinc low-pass, cutoff `fc` in cycles per input sample, unit DC gain. */
function lowPass(fc, taps) {
  const h = new Float32Array(taps);
  const mid = (taps - 1) / 2;
  let sum = 0;
  for (let i = 0; i < taps; i++) {
    const x = i - mid;
    const sinc = x === 0 ? 2 * fc : Math.sin(2 * Math.PI * fc * x) / (Math.PI * x);
    const w =
      0.42 -
      0.5 * Math.cos((2 * Math.PI * i) / (taps - 1)) +
      0.08 * Math.cos((4 * Math.PI * i) / (taps - 1));
    h[i] = sinc * w;
    sum += h[i];
  }
  for (let i = 0; i < taps; i++) h[i] /= sum;
  return h;
}

export class Resampler {
  /**
   * Convert a stream of float samples from `inRate` to `outRate` (Hz, positive integers).
   * Throws RangeError on a non-positive or non-finite rate. Equal rates pass samples
   * through untouched (the same array is returned).
   */
  constructor(inRate, outRate) {
    if (!(inRate > 0 && outRate > 0 && Number.isFinite(inRate) && Number.isFinite(outRate))) {
      throw new RangeError(`bad rates ${inRate} -> ${outRate}`);
    }
    this.inRate = inRate;
    this.outRate = outRate;
    this.step = inRate / outRate; // input samples per output sample
    this.passthrough = inRate === outRate;
    // Anti-alias only when going down; keep 10 % below the output Nyquist for the roll-off.
    this.taps = this.step > 1 ? lowPass((0.45 * outRate) / inRate, TAPS) : null;
    this.history = new Float32Array(TAPS - 1); // last inputs, for the FIR across calls
    this.t = 0; // position of the next output sample, in input samples; -1 = `last`
    this.last = 0; // the previous block's last (filtered) sample
  }

  /** Forget all state (after a flush: no tail of old audio leaks into new audio). */
  reset() {
    this.history.fill(0);
    this.t = 0;
    this.last = 0;
  }

  /** Resample one block; returns a new Float32Array (or `input` itself when passing through). */
  process(input) {
    if (this.passthrough) return input;
    const x = this.taps ? this.filter(input) : input;
    const n = x.length;
    const out = new Float32Array(Math.max(0, Math.ceil((n - this.t) / this.step)) + 1);
    let k = 0;
    let t = this.t;
    while (t <= n - 1) {
      const i = Math.floor(t);
      const f = t - i;
      const a = i < 0 ? this.last : x[i];
      const b = i + 1 < n ? x[i + 1] : a; // i + 1 === n only when f === 0
      out[k++] = a + (b - a) * f;
      t += this.step;
    }
    if (n > 0) {
      this.t = t - n;
      this.last = x[n - 1];
    }
    return out.subarray(0, k);
  }

  filter(input) {
    const h = this.taps;
    const m = h.length - 1;
    const hist = this.history;
    const n = input.length;
    const y = new Float32Array(n);
    for (let i = 0; i < n; i++) {
      let acc = 0;
      // Tap j meets input[i - j]; indices below 0 come from the previous call's tail.
      for (let j = 0; j <= m; j++) {
        const idx = i - j;
        acc += h[j] * (idx >= 0 ? input[idx] : hist[m + idx]);
      }
      y[i] = acc;
    }
    // Keep the last m inputs (some may still be in `hist` when the block is short).
    if (n >= m) {
      hist.set(input.subarray(n - m));
    } else {
      hist.copyWithin(0, n);
      hist.set(input, m - n);
    }
    return y;
  }
}

/** Float [-1, 1] to PCM16 with clipping (NaN becomes 0). */
export function floatToPcm16(x, out = new Int16Array(x.length)) {
  for (let i = 0; i < x.length; i++) {
    const s = x[i] > 1 ? 1 : x[i] < -1 ? -1 : x[i] || 0;
    out[i] = s < 0 ? Math.round(s * 32768) : Math.round(s * 32767);
  }
  return out;
}
