// Any picture of a digit -> the network's input, exactly as pipeline/digits.py makes it.
//
// This is a port of pipeline/digits.py (decode, then to_mnist), step for step, and of the
// parts of Pillow those steps call: convert("L"), thumbnail(BOX) (reduce, then resample)
// and resize(LANCZOS) on float pixels, with Pillow's own fixed-point and float32 arithmetic,
// so that the page and the pipeline give the network the same 28x28 frame for the same
// picture. tests/test_browser.py checks that in headless Chromium, against pipeline/digits.py.
//
// Every array of grey levels is a Float32Array, as numpy's are float32 in digits.py: each
// arithmetic step is rounded to float32 (Math.fround) where numpy rounds it.

export const MAX_PIXELS = 4096 * 4096;  // a larger picture is refused
export const MAX_SIDE = 1024;  // larger pictures are shrunk to this first
export const INK_THRESHOLD = Math.fround(0.2);  // fraction of full intensity that counts as ink when cropping
export const SIDE = 28, BOX = 20;  // the MNIST frame and the box the digit is scaled into
export const CENTRE = 14;  // MNIST's centre of mass, in pixel indices (row and column)

const f32 = Math.fround;

/** A picture with no digit in it, or one too large: said on the page as it is. */
export class ImageError extends Error {
  constructor(message) { super(message); this.name = "ImageError"; }
}

/**
 * An RGBA picture (as a canvas's getImageData gives it) -> grey levels in [0, 1]: digits.decode.
 * Returns {grey: Float32Array (height * width, row-major), width, height}.
 */
export function decode(rgba, width, height) {
  if (width * height > MAX_PIXELS) {
    throw new ImageError(`image is ${width}x${height}; at most ${MAX_PIXELS.toLocaleString("en")} pixels`);
  }
  // Pillow opens a picture with transparency as LA (else L); the browser gives RGBA for every
  // picture, so a picture is "with alpha" when some pixel is not opaque (an opaque LA picture
  // gives the same frame as the L one: its opacity is 1 everywhere).
  let alpha = false;
  for (let i = 3; i < rgba.length; i += 4) {
    if (rgba[i] !== 255) { alpha = true; break; }
  }
  const bands = alpha ? 2 : 1;
  const pixels = new Uint8Array(width * height * bands);
  for (let p = 0; p < width * height; p++) {
    // Pillow's L24: ITU-R 601-2 luma in 16-bit fixed point, halves rounded up
    pixels[p * bands] = (rgba[4 * p] * 19595 + rgba[4 * p + 1] * 38470 + rgba[4 * p + 2] * 7471 + 0x8000) >> 16;
    if (alpha) pixels[p * bands + 1] = rgba[4 * p + 3];
  }
  const small = thumbnail({data: pixels, width, height, bands}, MAX_SIDE);

  const n = small.width * small.height;
  const grey = new Float32Array(n), opacity = new Float32Array(n);
  for (let p = 0; p < n; p++) {
    grey[p] = f32(small.data[p * bands] / 255);
    if (alpha) opacity[p] = f32(small.data[p * bands + 1] / 255);
  }
  if (!alpha) return {grey, width: small.width, height: small.height};
  // Transparent pixels are background: put them on the opposite of the ink's colour.
  let inked = 0, inkedGrey = 0;
  for (let p = 0; p < n; p++) {
    if (opacity[p] > 0.5) { inked++; inkedGrey += grey[p]; }
  }
  const background = inked > 0 && inkedGrey / inked < 0.5 ? 1 : 0;
  for (let p = 0; p < n; p++) {
    grey[p] = f32(f32(grey[p] * opacity[p]) + f32(background * f32(1 - opacity[p])));
  }
  return {grey, width: small.width, height: small.height};
}

/** Grey levels (height x width) in [0, 1] -> a 28x28 MNIST-style frame, white digit on black: digits.to_mnist. */
export function toMnist(grey, width, height) {
  // The background is whatever fills the border; MNIST's is black, so a light one is inverted.
  const border = [];
  for (let x = 0; x < width; x++) border.push(grey[x], grey[(height - 1) * width + x]);
  for (let y = 0; y < height; y++) border.push(grey[y * width], grey[y * width + width - 1]);
  const median = medianF32(border);
  const light = median > 0.5;
  const level = light ? f32(1 - median) : median;  // the background's ink level, taken off every pixel
  const ink = new Float32Array(width * height);
  let peak = 0;
  for (let p = 0; p < ink.length; p++) {
    ink[p] = Math.max(f32((light ? f32(1 - grey[p]) : grey[p]) - level), 0);  // grey -> black
    peak = Math.max(peak, ink[p]);
  }
  if (peak <= f32(0.05)) throw new ImageError("the image is blank: no digit found");
  for (let p = 0; p < ink.length; p++) ink[p] = f32(ink[p] / peak);

  // The bounding box of the ink.
  let top = height, bottom = -1, left = width, right = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (ink[y * width + x] > INK_THRESHOLD) {
        top = Math.min(top, y); bottom = Math.max(bottom, y);
        left = Math.min(left, x); right = Math.max(right, x);
      }
    }
  }
  const h = bottom - top + 1, w = right - left + 1;
  const crop = new Float32Array(h * w);
  for (let y = 0; y < h; y++) crop.set(ink.subarray((top + y) * width + left, (top + y) * width + left + w), y * w);
  const scale = BOX / Math.max(h, w);
  const sw = Math.max(1, roundHalfEven(w * scale)), sh = Math.max(1, roundHalfEven(h * scale));
  const small = resize({data: crop, width: w, height: h, bands: 1}, sw, sh, LANCZOS, [0, 0, w, h]).data;

  const frame = new Float32Array(SIDE * SIDE);
  const y0 = Math.floor((SIDE - sh) / 2), x0 = Math.floor((SIDE - sw) / 2);
  for (let y = 0; y < sh; y++) {
    for (let x = 0; x < sw; x++) frame[(y0 + y) * SIDE + x0 + x] = Math.min(Math.max(small[y * sw + x], 0), 1);
  }
  // Shift the centre of mass to where MNIST has it (whole pixels, clipped to fit): pixel (14, 14).
  let mass = 0, my = 0, mx = 0;
  for (let y = 0; y < SIDE; y++) {
    for (let x = 0; x < SIDE; x++) {
      const v = frame[y * SIDE + x];
      mass += v; my += y * v; mx += x * v;
    }
  }
  const dy = clip(roundHalfEven(CENTRE - my / mass), -y0, SIDE - y0 - sh);
  const dx = clip(roundHalfEven(CENTRE - mx / mass), -x0, SIDE - x0 - sw);
  const shifted = new Float32Array(SIDE * SIDE);  // np.roll; the clip keeps the ink from wrapping round
  for (let y = 0; y < SIDE; y++) {
    for (let x = 0; x < SIDE; x++) {
      shifted[((y + dy + SIDE) % SIDE) * SIDE + (x + dx + SIDE) % SIDE] = frame[y * SIDE + x];
    }
  }
  return shifted;
}

/** An RGBA picture -> the model's input: 784 float32 values in [0, 1], shape (1, 1, 28, 28). */
export function toInput(rgba, width, height) {
  const {grey, width: w, height: h} = decode(rgba, width, height);
  return toMnist(grey, w, h);
}

// ---------------------------------------------------------------------------- arithmetic as numpy and Python do it

/** Python's round(): halves go to the even neighbour (round(12.5) == 12). */
export function roundHalfEven(x) {
  const r = Math.round(x);  // halves up
  return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

function clip(v, lo, hi) { return Math.min(Math.max(v, lo), hi); }

/** np.median of float32 values: an even count's median is the float32 mean of the middle two. */
function medianF32(values) {
  const sorted = Float32Array.from(values).sort();
  const n = sorted.length;
  if (n % 2) return sorted[(n - 1) / 2];
  return f32(f32(sorted[n / 2 - 1] + sorted[n / 2]) / 2);
}

// ---------------------------------------------------------------------------- Pillow's resampling (libImaging/Resample.c, Reduce.c)

const BOX_FILTER = {support: 0.5, weight: x => (x > -0.5 && x <= 0.5 ? 1 : 0)};
const LANCZOS = {
  support: 3,
  weight: x => (x >= -3 && x < 3 ? sinc(x) * sinc(x / 3) : 0),  // truncated sinc
};
function sinc(x) { return x === 0 ? 1 : Math.sin(Math.PI * x) / (Math.PI * x); }

/**
 * Image.thumbnail((side, side), BOX) on 8-bit pixels (1 band: L, 2: LA): the aspect ratio kept,
 * never enlarged. Pillow first reduces by a whole factor (box averages) while the picture is more
 * than twice the size wanted (reducing_gap=2), then resamples the rest with the box filter; an LA
 * picture is resized with its grey premultiplied by its alpha.
 */
function thumbnail(img, side) {
  if (side >= img.width && side >= img.height) return img;
  const aspect = img.width / img.height;
  let [w, h] = [side, side];
  const nearest = (number, key) => Math.max(key(Math.floor(number)) <= key(Math.ceil(number))
    ? Math.floor(number) : Math.ceil(number), 1);
  if (1 >= aspect) w = nearest(side * aspect, n => Math.abs(aspect - n / side));
  else h = nearest(side / aspect, n => (n === 0 ? 0 : Math.abs(aspect - side / n)));
  if (w === img.width && h === img.height) return img;

  let src = img.bands === 2 ? premultiply(img) : img;
  let box = [0, 0, img.width, img.height];
  const fx = Math.trunc(img.width / w / 2) || 1, fy = Math.trunc(img.height / h / 2) || 1;
  if (fx > 1 || fy > 1) {
    src = reduce(src, fx, fy);
    box = [0, 0, img.width / fx, img.height / fy];
  }
  const out = resize(src, w, h, BOX_FILTER, box);
  return img.bands === 2 ? unpremultiply(out) : out;
}

function muldiv255(a, b) { const t = a * b + 128; return ((t >> 8) + t) >> 8; }

function premultiply(img) {  // Convert.c lA2la
  const data = Uint8Array.from(img.data);
  for (let p = 0; p < data.length; p += 2) data[p] = muldiv255(data[p], data[p + 1]);
  return {...img, data};
}

function unpremultiply(img) {  // Convert.c la2lA
  const data = Uint8Array.from(img.data);
  for (let p = 0; p < data.length; p += 2) {
    const a = data[p + 1];
    if (a !== 255 && a !== 0) data[p] = Math.min(Math.floor((255 * data[p]) / a), 255);
  }
  return {...img, data};
}

/** Image.reduce((fx, fy)): the rounded mean of each fx x fy box (the last row and column take what is left). */
function reduce(img, fx, fy) {
  const width = Math.ceil(img.width / fx), height = Math.ceil(img.height / fy), {bands} = img;
  const data = new Uint8Array(width * height * bands);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const xs = [x * fx, Math.min((x + 1) * fx, img.width)], ys = [y * fy, Math.min((y + 1) * fy, img.height)];
      const count = (xs[1] - xs[0]) * (ys[1] - ys[0]);
      // Pillow divides in fixed point: (sum + count / 2) * (2^32 / (256 * count), a float32) >> 24
      const multiplier = Math.trunc(f32(2 ** 32 / f32(256 * count)));
      for (let b = 0; b < bands; b++) {
        let sum = Math.floor(count / 2);
        for (let yy = ys[0]; yy < ys[1]; yy++) {
          for (let xx = xs[0]; xx < xs[1]; xx++) sum += img.data[(yy * img.width + xx) * bands + b];
        }
        data[(y * width + x) * bands + b] = Math.floor((sum * multiplier) / 2 ** 24);
      }
    }
  }
  return {data, width, height, bands};
}

/**
 * Image.resize((width, height), filter, box): two passes of a separable filter, horizontal
 * first. 8-bit pixels (a Uint8Array) are resampled with Pillow's 22-bit fixed-point weights and
 * rounded to 8 bits after each pass; float pixels (a Float32Array) in double, stored as float32.
 */
function resize(img, width, height, filter, box) {
  if (width === img.width && height === img.height && box[0] === 0 && box[1] === 0
      && box[2] === img.width && box[3] === img.height) {
    return img;  // Pillow returns a copy
  }
  box = box.map(f32);  // the box reaches C as floats
  const needHorizontal = width !== img.width || box[0] !== 0 || box[2] !== width;
  const needVertical = height !== img.height || box[1] !== 0 || box[3] !== height;
  let out = img;
  if (needHorizontal) out = resamplePass(out, coefficients(img.width, box[0], box[2], width, filter), true);
  if (needVertical) out = resamplePass(out, coefficients(img.height, box[1], box[3], height, filter), false);
  return out;
}

/** Resample.c precompute_coeffs: for each output pixel, the first input pixel it reads and its weights. */
function coefficients(inSize, in0, in1, outSize, filter) {
  const scale = f32(in1 - in0) / outSize;
  const filterScale = Math.max(scale, 1);  // when shrinking, the filter widens with the scale
  const support = filter.support * filterScale;
  const ss = 1 / filterScale;
  const taps = [];
  for (let xx = 0; xx < outSize; xx++) {
    const centre = in0 + (xx + 0.5) * scale;
    const xmin = Math.max(Math.trunc(centre - support + 0.5), 0);
    const xmax = Math.min(Math.trunc(centre + support + 0.5), inSize) - xmin;
    const weights = [];
    let total = 0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.weight((x + xmin - centre + 0.5) * ss);
      weights.push(w);
      total += w;
    }
    taps.push({first: xmin, weights: total !== 0 ? weights.map(w => w / total) : weights});
  }
  return taps;
}

function resamplePass(img, taps, horizontal) {
  const eightBit = img.data instanceof Uint8Array, {bands} = img, source = img.data;
  const width = horizontal ? taps.length : img.width, height = horizontal ? img.height : taps.length;
  const data = eightBit ? new Uint8Array(width * height * bands) : new Float32Array(width * height * bands);
  const PRECISION_BITS = 32 - 8 - 2;  // 8-bit results; 2 bits spare for the filter's overshoot
  const weights = taps.map(t => (eightBit
    ? Int32Array.from(t.weights, w => Math.trunc((w < 0 ? -0.5 : 0.5) + w * 2 ** PRECISION_BITS))
    : Float64Array.from(t.weights)));
  const step = (horizontal ? 1 : img.width) * bands;  // from one tap to the next, in the source
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const i = horizontal ? x : y, k = weights[i];
      const first = (horizontal ? y * img.width + taps[i].first : taps[i].first * img.width + x) * bands;
      for (let b = 0; b < bands; b++) {
        let sum = eightBit ? 1 << (PRECISION_BITS - 1) : 0;  // fixed point: a half, to round
        for (let t = 0, at = first + b; t < k.length; t++, at += step) sum += source[at] * k[t];
        data[(y * width + x) * bands + b] = eightBit ? clip(sum >> PRECISION_BITS, 0, 255) : sum;  // float32 stored
      }
    }
  }
  return {data, width, height, bands};
}
