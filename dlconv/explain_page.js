// dlconv explain --html: the page's script (teaching material: read it next to the Python).
//
// Every function in the first half mirrors one in the Python package, with the same name
// in camelCase, the same loops and the same strings, so the page shows exactly what
// `dlconv explain --json` prints (tests/test_explain_html.py compares the two in Chromium):
//
//   resolveAxis, geometry      dlconv/shapes.py           resolve_axis, conv_geometry
//   forward, reverse,          dlconv/explain.py          _forward, _reverse, _weight_grad,
//   weightGrad, groupChannels                             group_channels, _locations
//   arithmetic                 dlconv/conv_arithmetic.py  arithmetic
//   xOffset ... cpuTile        dlconv/locate.py           x_offset ... cpu_tile
//
// KERNEL_CONSTANTS (the kernels' launch constants), VARIANT_LABELS (the variant names, from the
// variant tables: dlconv.locate.VARIANT_LABELS) and INITIAL (the geometry the page was written
// for) are put in front of this script by dlconv/explain_html.py.
// Notation (the workshop's): filters A, B, ...; I1, I2, ... one channel's input, row-major
// from 1; B1, B2, ... filter B's taps; O1, O2, ... outputs, consecutive across filters;
// with C > 1 the 1-based channel in brackets, I5[c2].  Indices in code are 0-based.
"use strict";

// ------------------------------------------------------------------ geometry (dlconv.shapes)
function effectiveKernel(k, d) { return (k - 1) * d + 1; }

// One axis -> {before, after, out}; mode "valid" | "same" | "explicit" (pads given).
function resolveAxis(n, k, s, d, mode, before, after, axis) {
  const kEff = effectiveKernel(k, d);
  if (mode === "valid") { before = 0; after = 0; }
  else if (mode === "same") {                      // TensorFlow's rule: the odd one goes after
    const out = Math.ceil(n / s);
    const total = Math.max((out - 1) * s + kEff - n, 0);
    before = Math.floor(total / 2);
    after = total - before;
  }
  const padded = n + before + after;
  if (kEff > padded) {
    throw new Error(`kernel (${axis}) ${k}` + (d > 1 ? ` with dilation ${d} (effective size ${kEff})` : "")
                    + ` is larger than the padded input (${axis}): ${n} + ${before} + ${after} = ${padded}`);
  }
  return { before, after, out: Math.floor((padded - kEff) / s) + 1 };
}

// cfg: {h, w, c, kh, kw, filters, sh, sw, padding, pads: [t, b, l, r], dh, dw, groups}
function geometry(cfg) {
  for (const key of ["h", "w", "c", "kh", "kw", "filters", "sh", "sw", "dh", "dw", "groups"]) {
    if (!Number.isInteger(cfg[key]) || cfg[key] < 1) throw new Error(`${key} must be an integer >= 1, got ${cfg[key]}`);
  }
  if (cfg.c % cfg.groups || cfg.filters % cfg.groups) {
    throw new Error(`groups=${cfg.groups} must divide the input channels (${cfg.c}) and the filters (${cfg.filters})`);
  }
  const p = cfg.pads || [0, 0, 0, 0];
  const hAxis = resolveAxis(cfg.h, cfg.kh, cfg.sh, cfg.dh, cfg.padding, p[0], p[1], "height");
  const wAxis = resolveAxis(cfg.w, cfg.kw, cfg.sw, cfg.dw, cfg.padding, p[2], p[3], "width");
  return {
    in_h: cfg.h, in_w: cfg.w, in_c: cfg.c, filters: cfg.filters, k_h: cfg.kh, k_w: cfg.kw,
    stride_h: cfg.sh, stride_w: cfg.sw, dil_h: cfg.dh, dil_w: cfg.dw,
    pad_top: hAxis.before, pad_bottom: hAxis.after, pad_left: wAxis.before, pad_right: wAxis.after,
    out_h: hAxis.out, out_w: wAxis.out, groups: cfg.groups, padding: cfg.padding,
  };
}

// ------------------------------------------------------------------ notation and groups
function filterLetter(index) {            // 0 -> A, 25 -> Z, 26 -> AA
  let letters = "", n = index + 1;
  while (n) { const r = (n - 1) % 26; n = Math.floor((n - 1) / 26); letters = String.fromCharCode(65 + r) + letters; }
  return letters;
}
function channel(c, channels) { return channels > 1 ? `[c${c + 1}]` : ""; }

// The input channels filter f reads: [start, stop) of its group q = f // (F/G).
function groupChannels(g, f) {
  const per = g.in_c / g.groups, q = Math.floor(f / (g.filters / g.groups));
  return [q * per, (q + 1) * per];
}

// ------------------------------------------------------------------ index maps (dlconv.explain)
// Forward: the equation of output (f, oh, ow).  ih = oh*stride_h - pad_top + kh*dil_h.
function forward(g, f, oh, ow) {
  const letter = filterLetter(f), terms = [];
  const [c0, c1] = groupChannels(g, f);
  for (let kh = 0; kh < g.k_h; kh++) {
    const ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
    for (let kw = 0; kw < g.k_w; kw++) {
      const iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
      if (!(ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w)) continue;   // the one guard: padding
      for (let c = c0; c < c1; c++) {
        const weight = kh * g.k_w + kw + 1, inp = ih * g.in_w + iw + 1, ch = channel(c, g.in_c);
        terms.push({ filter: letter, weight, channel: c + 1, input: inp, row: ih + 1, col: iw + 1, kh, kw,
                     label: `${letter}${weight}${ch}·I${inp}${ch}` });
      }
    }
  }
  const number = f * g.out_h * g.out_w + oh * g.out_w + ow + 1;
  const rhs = terms.length ? terms.map(t => t.label).join(" + ") : "0";
  return { output: number, filter: letter, row: oh + 1, col: ow + 1, terms, taps: g.k_h * g.k_w * (c1 - c0),
           text: `O${number} = ${rhs}` };
}

// Backward-data (the transposed convolution): every (output, weight) that reads input
// (c, ih, iw); oh = (ih + pad_top - kh*dil_h) / stride_h when that divides exactly.
function reverse(g, c, ih, iw, filters) {
  const terms = [], ch = channel(c, g.in_c);
  for (const f of filters) {
    const [c0, c1] = groupChannels(g, f);
    if (c < c0 || c >= c1) continue;
    const letter = filterLetter(f);
    for (let kh = 0; kh < g.k_h; kh++) {
      const numH = ih + g.pad_top - kh * g.dil_h;
      if (numH % g.stride_h !== 0 || !(numH / g.stride_h >= 0 && numH / g.stride_h < g.out_h)) continue;
      const oh = numH / g.stride_h;
      for (let kw = 0; kw < g.k_w; kw++) {
        const numW = iw + g.pad_left - kw * g.dil_w;
        if (numW % g.stride_w !== 0 || !(numW / g.stride_w >= 0 && numW / g.stride_w < g.out_w)) continue;
        const ow = numW / g.stride_w;
        const number = f * g.out_h * g.out_w + oh * g.out_w + ow + 1, weight = kh * g.k_w + kw + 1;
        terms.push({ output: number, filter: letter, weight, row: oh + 1, col: ow + 1,
                     label: `${letter}${weight}${ch}·dO${number}` });
      }
    }
  }
  terms.sort((a, b) => a.output - b.output || a.weight - b.weight);
  const inp = ih * g.in_w + iw + 1;
  const rhs = terms.length ? terms.map(t => t.label).join(" + ") : "0";
  return { input: inp, channel: c + 1, row: ih + 1, col: iw + 1, terms,
           text: `dI${inp}${ch} = ${rhs}` + (terms.length ? "" : "   (no output reads it)") };
}

// Backward-filter: weight (kh, kw, c) of filter f collects I·dO over the pairs that meet in it.
function weightGrad(g, f, c, kh, kw) {
  const letter = filterLetter(f), ch = channel(c, g.in_c), per = g.out_h * g.out_w, terms = [];
  for (let oh = 0; oh < g.out_h; oh++) {
    const ih = oh * g.stride_h - g.pad_top + kh * g.dil_h;
    for (let ow = 0; ow < g.out_w; ow++) {
      const iw = ow * g.stride_w - g.pad_left + kw * g.dil_w;
      if (ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w) {
        const inp = ih * g.in_w + iw + 1, out = f * per + oh * g.out_w + ow + 1;
        terms.push({ input: inp, output: out, in_row: ih + 1, in_col: iw + 1, out_row: oh + 1, out_col: ow + 1,
                     label: `I${inp}${ch}·dO${out}` });
      }
    }
  }
  const weight = kh * g.k_w + kw + 1;
  const rhs = terms.length ? terms.map(t => t.label).join(" + ") : "0";
  return { filter: letter, weight, channel: c + 1, row: kh + 1, col: kw + 1, terms, text: `d${letter}${weight}${ch} = ${rhs}` };
}

// ------------------------------------------------------------------ memory and kernels (dlconv.locate)
const cdiv = (a, b) => Math.ceil(a / b);
function xOffset(g, n, ih, iw, c) { return ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + c; }          // NHWC
function wOffset(g, kh, kw, ci, k) { return ((kh * g.k_w + kw) * (g.in_c / g.groups) + ci) * g.filters + k; } // HWIO, I = C/G
function yOffset(g, n, oh, ow, k) { return ((n * g.out_h + oh) * g.out_w + ow) * g.filters + k; }     // NHWC
function im2col(g, n, oh, ow, kh, kw, ci) {   // [row m (output pixel), column r (tap, channel)]
  return [(n * g.out_h + oh) * g.out_w + ow, (kh * g.k_w + kw) * (g.in_c / g.groups) + ci];
}

function numbaV2Refusal(g) {                  // kernels/conv2d_cuda.py v2_channel_chunk
  const K = KERNEL_CONSTANTS.numba_cuda;
  const haloH = (K.V2_TILE_H - 1) * g.stride_h + (g.k_h - 1) * g.dil_h + 1;
  const haloW = (K.V2_TILE_W - 1) * g.stride_w + (g.k_w - 1) * g.dil_w + 1;
  const cc = Math.min(g.in_c, Math.floor(K.V2_SMEM_X / (haloH * haloW)), Math.floor(K.V2_SMEM_W / (g.k_h * g.k_w * K.V2_TILE_K)));
  return cc < 1 ? `refused: the ${haloH}x${haloW} halo does not fit shared memory (use v3)` : null;
}

// Which block (blockIdx x, y) and thread (threadIdx x, y) of each CUDA forward computes y[n, oh, ow, k].
function cudaThreads(g, n, oh, ow, k) {
  const m = (n * g.out_h + oh) * g.out_w + ow, F = g.filters, idx = m * F + k;  // v1: k fastest
  const grouped = g.groups !== 1, noteGrouped = "grouped: runs " + VARIANT_LABELS.numba.v1;
  const K = KERNEL_CONSTANTS.numba_cuda;
  const nb = { v1: { block: [Math.floor(idx / K.V1_THREADS), 0], thread: [idx % K.V1_THREADS, 0], register: null, note: "" } };
  const tilesW = cdiv(g.out_w, K.V2_TILE_W), tiles = cdiv(g.out_h, K.V2_TILE_H) * tilesW;
  const ty = oh % K.V2_TILE_H, tx = ow % K.V2_TILE_W, kk = k % K.V2_TILE_K;
  nb.v2 = { block: [n * tiles + Math.floor(oh / K.V2_TILE_H) * tilesW + Math.floor(ow / K.V2_TILE_W), Math.floor(k / K.V2_TILE_K)],
            thread: [(ty * K.V2_TILE_W + tx) * K.V2_TILE_K + kk, 0], register: null,
            note: grouped ? noteGrouped : (numbaV2Refusal(g) || "") };
  let ml = m % K.V3_BM, kl = k % K.V3_BN;
  nb.v3 = { block: [Math.floor(m / K.V3_BM), Math.floor(k / K.V3_BN)],
            thread: [Math.floor(ml / K.V3_TM) * (K.V3_BN / K.V3_TN) + Math.floor(kl / K.V3_TN), 0],
            register: [ml % K.V3_TM, kl % K.V3_TN], note: grouped ? noteGrouped : "" };

  const C = KERNEL_CONSTANTS.cpp_cuda, t1 = C.THREADS_1D;
  const grid = Math.min(Math.max(cdiv(g.out_h * g.out_w * F, t1), 1), C.MAX_BLOCKS_1D);  // batch 1
  const slot = idx % (grid * t1);             // grid-stride loop
  const cc = { v1: { block: [Math.floor(slot / t1), 0], thread: [slot % t1, 0], register: null,
                     note: idx >= grid * t1 ? `grid-stride pass ${Math.floor(idx / (grid * t1))}` : "" } };
  cc.v2 = { block: [Math.floor(m / C.V2_TILE), Math.floor(k / C.V2_TILE)], thread: [k % C.V2_TILE, m % C.V2_TILE],
            register: null, note: grouped ? noteGrouped : "" };
  ml = m % C.V3_BM; kl = k % C.V3_BN;
  cc.v3 = { block: [Math.floor(m / C.V3_BM), Math.floor(k / C.V3_BN)],
            thread: [Math.floor(ml / C.V3_TM) * (C.V3_BN / C.V3_TN) + Math.floor(kl / C.V3_TN), 0],
            register: [ml % C.V3_TM, kl % C.V3_TN], note: grouped ? noteGrouped : "" };
  return { numba: nb, cpp: cc };
}

// csrc/cpu_conv_direct.h: one OpenMP item = one output row; 64-filter column panels; the
// row's OW pixels split into ceil(OW/R) near-equal tiles of R register rows.
function maxRows(nv) { return nv >= 4 ? 6 : nv === 3 ? 8 : 12; }
function cpuTile(g, n, oh, ow, k) {
  const K = KERNEL_CONSTANTS.cpp_cpu, panelW = K.MAX_NV * K.VL;
  const f0 = Math.floor(k / panelW) * panelW;
  const nv = cdiv(Math.min(panelW, g.filters - f0), K.VL), R = maxRows(nv), ntile = cdiv(g.out_w, R);
  let tile = 0;
  while (!(Math.floor(tile * g.out_w / ntile) <= ow && ow < Math.floor((tile + 1) * g.out_w / ntile))) tile++;
  const ow0 = Math.floor(tile * g.out_w / ntile), ow1 = Math.floor((tile + 1) * g.out_w / ntile);
  return { row_item: n * g.out_h + oh, panel: Math.floor(k / panelW), panel_filters: [f0, f0 + nv * K.VL],
           tile, tile_pixels: [ow0, ow1], tile_shape: [ow1 - ow0, nv], register_row: ow - ow0,
           zmm: Math.floor((k - f0) / K.VL), lane: (k - f0) % K.VL,
           note: g.groups !== 1 ? "grouped: cpu_conv_grouped.cpp, not this tile" : "" };
}

// The same records as dlconv.explain's Explanation.locations (batch element 1).
function locateOutput(g, f, oh, ow) {
  const eq = forward(g, f, oh, ow), c0 = groupChannels(g, f)[0];
  return { kind: "output", name: `O${eq.output}`, filter: eq.filter, y_offset: yOffset(g, 0, oh, ow, f),
           im2col_row: im2col(g, 0, oh, ow, 0, 0, 0)[0], cuda: cudaThreads(g, 0, oh, ow, f), cpu: cpuTile(g, 0, oh, ow, f),
           terms: eq.terms.map(t => ({ label: t.label, x_offset: xOffset(g, 0, t.row - 1, t.col - 1, t.channel - 1),
                                       w_offset: wOffset(g, t.kh, t.kw, t.channel - 1 - c0, f),
                                       im2col_col: im2col(g, 0, 0, 0, t.kh, t.kw, t.channel - 1 - c0)[1] })) };
}
function locateInput(g, c, ih, iw) {
  const r = reverse(g, c, ih, iw, allFilters(g));
  return { kind: "input", name: `I${r.input}${channel(c, g.in_c)}`, x_offset: xOffset(g, 0, ih, iw, c),
           terms: r.terms.map(t => {
             const f = filterIndex(t.filter), kh = Math.floor((t.weight - 1) / g.k_w), kw = (t.weight - 1) % g.k_w;
             return { label: t.label, dy_offset: yOffset(g, 0, t.row - 1, t.col - 1, f),
                      w_offset: wOffset(g, kh, kw, c - groupChannels(g, f)[0], f) };
           }) };
}
function locateWeight(g, f, c, kh, kw) {
  const wq = weightGrad(g, f, c, kh, kw);
  return { kind: "weight", name: wq.text.split(" = ")[0].slice(1), w_offset: wOffset(g, kh, kw, c - groupChannels(g, f)[0], f),
           terms: wq.terms.map(t => ({ label: t.label, x_offset: xOffset(g, 0, t.in_row - 1, t.in_col - 1, c),
                                       dy_offset: yOffset(g, 0, t.out_row - 1, t.out_col - 1, f) })) };
}
function allFilters(g) { return Array.from({ length: g.filters }, (_, f) => f); }
function filterIndex(letters) { let n = 0; for (const ch of letters) n = n * 26 + ch.charCodeAt(0) - 64; return n - 1; }

// ------------------------------------------------------------------ conv_arithmetic (dlconv.conv_arithmetic)
function arithmetic(g) {
  const axes = [];
  for (const [axis, i, k, s, d, pb, pa, o] of [
      ["height", g.in_h, g.k_h, g.stride_h, g.dil_h, g.pad_top, g.pad_bottom, g.out_h],
      ["width", g.in_w, g.k_w, g.stride_w, g.dil_w, g.pad_left, g.pad_right, g.out_w]]) {
    const kh = k + (k - 1) * (d - 1), P = pb + pa, ptxt = pb === pa ? `2·${pb}` : `${pb} + ${pa}`;
    const relations = [];
    const add = (name, formula, text, value, isThis) => relations.push({ name, formula, text, value, this: isThis });
    add("dilation: effective kernel", "k̂ = k + (k − 1)(d − 1)", `k̂ = ${k} + (${k} − 1)·(${d} − 1) = ${kh}`, kh, d > 1);
    let v = i - kh + 1;
    add("no padding, unit stride", "o = (i − k̂) + 1", `o = (${i} − ${kh}) + 1 = ${v}`, v >= 1 ? v : null, P === 0 && s === 1);
    v = i - kh + P + 1;
    add("zero padding, unit stride", "o = (i − k̂) + 2p + 1", `o = (${i} − ${kh}) + ${ptxt} + 1 = ${v}`, v >= 1 ? v : null, P > 0 && s === 1);
    const half = Math.floor(kh / 2);
    if (kh % 2) {
      add("half (same) padding, unit stride", "p = ⌊k̂/2⌋, o = i", `p = ⌊${kh}/2⌋ = ${half}, o = ${i}`, i, s === 1 && pb === half && pa === half);
    } else {
      const before = Math.floor((kh - 1) / 2);
      add("half (same) padding, unit stride", "p = ⌊k̂/2⌋, o = i (k̂ odd)",
          `k̂ = ${kh} is even: no symmetric half padding ('same' pads ${kh - 1} split ${before} before, ${kh - 1 - before} after)`, null, false);
    }
    add("full padding, unit stride", "p = k̂ − 1, o = i + (k̂ − 1)", `p = ${kh - 1}, o = ${i} + (${kh} − 1) = ${i + kh - 1}`, i + kh - 1,
        s === 1 && pb === kh - 1 && pa === kh - 1);
    v = i >= kh ? Math.floor((i - kh) / s) + 1 : null;
    add("no padding, stride s", "o = ⌊(i − k̂)/s⌋ + 1", v ? `o = ⌊(${i} − ${kh})/${s}⌋ + 1 = ${v}` : `i = ${i} < k̂ = ${kh}: no output`, v, P === 0 && s > 1);
    v = Math.floor((i + P - kh) / s) + 1;
    add("padding and stride (general)", "o = ⌊(i + 2p − k̂)/s⌋ + 1", `o = ⌊(${i} + ${ptxt} − ${kh})/${s}⌋ + 1 = ${v}`, v, true);
    // The transposed convolution as a direct one over the output with zeros inserted.
    const a = (i + P - kh) % s, ip = o, stretched = (ip - 1) * s + 1, pbp = kh - 1 - pb, pap = kh - 1 - pa;
    const op = s * (ip - 1) + a + kh - P;
    const text = `transposed: i′ = ${ip} (this output), ${s - 1} zero(s) between inputs → ${stretched}, `
      + `a = (i + 2p − k̂) mod s = (${i} + ${ptxt} − ${kh}) mod ${s} = ${a} extra at the end; direct conv with k′ = ${kh}, s′ = 1, `
      + `p′ = k̂ − 1 − p = ` + (pbp === pap ? `${pbp}` : `${pbp} before, ${pap} after`)
      + `: o′ = s(i′ − 1) + a + k̂ − 2p = ${s}·(${ip} − 1) + ${a} + ${kh} − ${pb === pa ? "2·" + pb : P} = ${op}`
      + (Math.min(pbp, pap) < 0 ? " (p′ < 0: crop instead of pad)" : "");
    axes.push({ axis, i, k, s, d, p_before: pb, p_after: pa, k_hat: kh, o, relations,
                transposed: { i_prime: ip, k_prime: kh, s_prime: 1, p_prime_before: pbp, p_prime_after: pap, a,
                              zeros_between: s - 1, stretched, o_prime: op, text } });
  }
  return axes;
}

// ------------------------------------------------------------------ generated framework code
function kerasCode(g) {
  const pair = (a, b) => `(${a}, ${b})`;
  const explicit = g.padding === "explicit";
  const args = `filters=${g.filters}, kernel_size=${pair(g.k_h, g.k_w)}, strides=${pair(g.stride_h, g.stride_w)}, `
    + `padding="${explicit ? "valid" : g.padding}", dilation_rate=${pair(g.dil_h, g.dil_w)}` + (g.groups > 1 ? `, groups=${g.groups}` : "");
  const lines = ["import keras", "", "model = keras.Sequential([", `    keras.Input((${g.in_h}, ${g.in_w}, ${g.in_c})),`];
  if (explicit) lines.push(`    keras.layers.ZeroPadding2D(((${g.pad_top}, ${g.pad_bottom}), (${g.pad_left}, ${g.pad_right}))),`);
  lines.push(`    keras.layers.Conv2D(${args}),`, "])");
  lines.push(`print(model.output_shape)   # (None, ${g.out_h}, ${g.out_w}, ${g.filters})`);
  if ((g.stride_h > 1 || g.stride_w > 1) && (g.dil_h > 1 || g.dil_w > 1)) {
    lines.push("# note: Keras' Conv2D refuses strides > 1 together with dilation_rate > 1");
  }
  return lines.join("\n");
}
function torchCode(g) {
  const symmetric = g.pad_top === g.pad_bottom && g.pad_left === g.pad_right;
  const conv = `torch.nn.Conv2d(${g.in_c}, ${g.filters}, kernel_size=(${g.k_h}, ${g.k_w}), stride=(${g.stride_h}, ${g.stride_w}), `
    + `padding=${symmetric ? `(${g.pad_top}, ${g.pad_left})` : "0"}, dilation=(${g.dil_h}, ${g.dil_w}), groups=${g.groups})`;
  const lines = ["import torch", ""];
  if (g.padding === "same") lines.push("# 'same' resolved by TensorFlow's rule (torch's 'same' refuses strides > 1)");
  if (symmetric) lines.push(`layer = ${conv}`);
  else lines.push("layer = torch.nn.Sequential(", `    torch.nn.ZeroPad2d((${g.pad_left}, ${g.pad_right}, ${g.pad_top}, ${g.pad_bottom})),  # (left, right, top, bottom)`,
                  `    ${conv},`, ")");
  lines.push(`y = layer(torch.zeros(1, ${g.in_c}, ${g.in_h}, ${g.in_w}))`, `print(tuple(y.shape))   # (1, ${g.filters}, ${g.out_h}, ${g.out_w})`);
  return lines.join("\n");
}

// Everything dlconv explain --json computes for one choice, for the browser test.
function explainAt(cfg, choice) {
  const g = geometry(cfg);
  const out = { geometry: g, arithmetic: arithmetic(g) };
  if (choice.kind === "output") {
    out.equation = forward(g, choice.f, choice.oh, choice.ow);
    out.location = locateOutput(g, choice.f, choice.oh, choice.ow);
  } else if (choice.kind === "input") {
    out.reverse = reverse(g, choice.c, choice.ih, choice.iw, allFilters(g));
    out.location = locateInput(g, choice.c, choice.ih, choice.iw);
  } else {
    out.weight = weightGrad(g, choice.f, choice.c, choice.kh, choice.kw);
    out.location = locateWeight(g, choice.f, choice.c, choice.kh, choice.kw);
  }
  return out;
}

// ================================================================== the page
const MAX_DRAWN = 40;          // grids larger than this per side are not drawn (the rest still works)
const PLAY_MS = 700;           // one output per step while playing
const state = { cfg: null, g: null, f: 0, c: 0, sel: null, timer: null };
const $ = id => document.getElementById(id);

function readControls() {
  const num = id => parseInt($(id).value, 10);
  return { h: num("in-h"), w: num("in-w"), c: num("in-c"), kh: num("k-h"), kw: num("k-w"), filters: num("filters"),
           sh: num("s-h"), sw: num("s-w"), padding: $("padding").value,
           pads: [num("p-t"), num("p-b"), num("p-l"), num("p-r")], dh: num("d-h"), dw: num("d-w"), groups: num("groups") };
}
function writeControls(cfg) {
  const set = (id, v) => { $(id).value = v; };
  set("in-h", cfg.h); set("in-w", cfg.w); set("in-c", cfg.c); set("k-h", cfg.kh); set("k-w", cfg.kw);
  set("filters", cfg.filters); set("s-h", cfg.sh); set("s-w", cfg.sw); set("padding", cfg.padding);
  [["p-t", 0], ["p-b", 1], ["p-l", 2], ["p-r", 3]].forEach(([id, i]) => set(id, cfg.pads[i]));
  set("d-h", cfg.dh); set("d-w", cfg.dw); set("groups", cfg.groups);
}

function recompute() {
  stop();
  const cfg = readControls();
  document.querySelectorAll(".explicit").forEach(e => { e.disabled = cfg.padding !== "explicit"; });
  let g;
  try { g = geometry(cfg); } catch (err) { $("error").textContent = err.message; return; }
  $("error").textContent = "";
  state.cfg = cfg; state.g = g;
  document.querySelectorAll(".grid").forEach(b => { b.dataset.key = ""; });
  fillSelect("filter-pick", g.filters, i => `filter ${filterLetter(i)}`);
  fillSelect("channel-pick", g.in_c, i => `channel ${i + 1}`);
  state.f = Math.min(state.f, g.filters - 1); state.c = groupChannels(g, state.f)[0];
  $("filter-pick").value = state.f; $("channel-pick").value = state.c;
  $("step").max = g.out_h * g.out_w - 1; $("step").value = 0;
  renderSummary(); renderArithmetic(); renderCode();
  select({ kind: "output", f: state.f, oh: 0, ow: 0 });
}
function fillSelect(id, n, label) {
  const el = $(id); el.innerHTML = "";
  for (let i = 0; i < n; i++) { const o = document.createElement("option"); o.value = i; o.textContent = label(i); el.appendChild(o); }
}

function renderSummary() {
  const g = state.g, per = g.out_h * g.out_w;
  const groupsText = g.groups > 1 ? allGroups(g).join("; ") : "every filter reads every channel";
  $("summary").textContent =
    `Output ${g.out_h}×${g.out_w}×${g.filters} (O1–O${per * g.filters}; filter ${filterLetter(state.f)}: O${state.f * per + 1}–O${(state.f + 1) * per}). `
    + `Padding top ${g.pad_top}, bottom ${g.pad_bottom}, left ${g.pad_left}, right ${g.pad_right}. `
    + `Weights ${g.k_h}·${g.k_w}·${g.in_c / g.groups}·${g.filters} = ${g.k_h * g.k_w * (g.in_c / g.groups) * g.filters}. Groups: ${groupsText}.`;
}
function allGroups(g) {
  const per = g.filters / g.groups, out = [];
  for (let q = 0; q < g.groups; q++) {
    const [c0, c1] = groupChannels(g, q * per);
    out.push(`${filterLetter(q * per)}..${filterLetter((q + 1) * per - 1)} read c${c0 + 1}–c${c1}`);
  }
  return out;
}

// Draw the padded input (channel state.c), the weights of (state.f, state.c) and the output of state.f.
function renderGrids(hot) {
  const g = state.g, f = state.f, c = state.c, letter = filterLetter(f), per = g.out_h * g.out_w, ch = channel(c, g.in_c);
  const hp = g.in_h + g.pad_top + g.pad_bottom, wp = g.in_w + g.pad_left + g.pad_right;
  const reads = groupChannels(g, f), readsC = c >= reads[0] && c < reads[1];
  drawGrid("grid-input", hp, wp, (r, q) => {
    const ih = r - g.pad_top, iw = q - g.pad_left;
    if (ih < 0 || ih >= g.in_h || iw < 0 || iw >= g.in_w) return { text: "0", cls: hot.window.has(`${r},${q}`) ? "pad win" : "pad" };
    const key = `${c},${ih},${iw}`;
    const cls = (hot.inputs.has(key) ? "hot" : "") + (hot.window.has(`${r},${q}`) ? " win" : "");
    return { text: `I${ih * g.in_w + iw + 1}${ch}`, cls: cls.trim(), kind: "input", at: [c, ih, iw] };
  }, `padded input, channel ${c + 1} of ${g.in_c}`);
  drawGrid("grid-weights", g.k_h, g.k_w, (r, q) => ({
    text: readsC ? `${letter}${r * g.k_w + q + 1}${ch}` : "—", cls: hot.weights.has(`${r},${q}`) ? "hot" : (readsC ? "" : "pad"),
    kind: readsC ? "weight" : null, at: [f, c, r, q] }),
    readsC ? `weights ${letter}, channel ${c + 1}` : `filter ${letter} does not read channel ${c + 1} (groups)`);
  drawGrid("grid-output", g.out_h, g.out_w, (r, q) => ({
    text: `O${f * per + r * g.out_w + q + 1}`, cls: hot.outputs.has(`${r},${q}`) ? "hot" : "", kind: "output", at: [f, r, q] }),
    `output of filter ${letter}`);
}
// Build a grid's table once per (shape, caption); later calls only restyle its cells, so a
// hover never replaces the element under the pointer.
function drawGrid(id, rows, cols, cell, caption) {
  const box = $(id), key = `${rows}x${cols}:${caption}`;
  if (box.dataset.key === key) {
    const table = box.querySelector("table");
    if (table) for (let r = 0; r < rows; r++) for (let q = 0; q < cols; q++) table.rows[r].cells[q].className = cell(r, q).cls;
    return;
  }
  box.dataset.key = key; box.innerHTML = "";
  const cap = document.createElement("div"); cap.className = "caption"; cap.textContent = caption; box.appendChild(cap);
  if (rows > MAX_DRAWN || cols > MAX_DRAWN) {
    const p = document.createElement("p"); p.textContent = `${rows}×${cols}: too large to draw (the slider and formulas still work)`;
    box.appendChild(p); return;
  }
  const table = document.createElement("table");
  for (let r = 0; r < rows; r++) {
    const tr = table.insertRow();
    for (let q = 0; q < cols; q++) {
      const spec = cell(r, q), td = tr.insertCell();
      td.textContent = spec.text; td.className = spec.cls;
      if (spec.kind) { td.dataset.kind = spec.kind; td.dataset.at = spec.at.join(","); td.addEventListener("click", onCell); td.addEventListener("mouseenter", onHover); }
    }
  }
  box.appendChild(table);
}
function choiceOf(td) {
  const a = td.dataset.at.split(",").map(Number);
  if (td.dataset.kind === "output") return { kind: "output", f: a[0], oh: a[1], ow: a[2] };
  if (td.dataset.kind === "input") return { kind: "input", c: a[0], ih: a[1], iw: a[2] };
  return { kind: "weight", f: a[0], c: a[1], kh: a[2], kw: a[3] };
}
function onCell(ev) { stop(); state.pinned = true; select(choiceOf(ev.currentTarget)); }
function onHover(ev) { if (!state.pinned && !state.timer) select(choiceOf(ev.currentTarget)); }

// Select an output, an input or a weight: highlight what meets in it and show its sums.
function select(choice) {
  const g = state.g, hot = { inputs: new Set(), weights: new Set(), outputs: new Set(), window: new Set() };
  let text, loc;
  if (choice.kind === "output") {
    const eq = forward(g, choice.f, choice.oh, choice.ow);
    eq.terms.forEach(t => { hot.inputs.add(`${t.channel - 1},${t.row - 1},${t.col - 1}`); if (t.channel - 1 === state.c) hot.weights.add(`${t.kh},${t.kw}`); });
    hot.outputs.add(`${choice.oh},${choice.ow}`);
    for (let kh = 0; kh < g.k_h; kh++) {          // the window's taps in padded coordinates (padding included)
      for (let kw = 0; kw < g.k_w; kw++) hot.window.add(`${choice.oh * g.stride_h + kh * g.dil_h},${choice.ow * g.stride_w + kw * g.dil_w}`);
    }
    text = eq.text; loc = locateOutput(g, choice.f, choice.oh, choice.ow);
    $("step").value = choice.oh * g.out_w + choice.ow;
  } else if (choice.kind === "input") {
    state.c = choice.c;
    const r = reverse(g, choice.c, choice.ih, choice.iw, allFilters(g));
    hot.inputs.add(`${choice.c},${choice.ih},${choice.iw}`);
    r.terms.forEach(t => { if (filterIndex(t.filter) === state.f) { hot.outputs.add(`${t.row - 1},${t.col - 1}`); hot.weights.add(`${Math.floor((t.weight - 1) / g.k_w)},${(t.weight - 1) % g.k_w}`); } });
    text = r.text; loc = locateInput(g, choice.c, choice.ih, choice.iw);
  } else {
    const wq = weightGrad(g, choice.f, choice.c, choice.kh, choice.kw);
    hot.weights.add(`${choice.kh},${choice.kw}`);
    wq.terms.forEach(t => { hot.inputs.add(`${choice.c},${t.in_row - 1},${t.in_col - 1}`); hot.outputs.add(`${(t.out_row - 1)},${t.out_col - 1}`); });
    text = wq.text; loc = locateWeight(g, choice.f, choice.c, choice.kh, choice.kw);
  }
  state.sel = choice;
  $("channel-pick").value = state.c;
  renderGrids(hot);
  $("equation").textContent = text;
  $("equation-kind").textContent = { output: "Forward: the output's sum (bias not shown, padding terms left out)",
    input: "Backward-data (the transposed convolution): dI = Σ w·dO over every output this input feeds",
    weight: "Backward-filter: dW = Σ I·dO over the (input, output) pairs that meet in this weight" }[choice.kind];
  renderDetails(loc);
}

// The memory / GEMM / kernel table; every value cell carries data-key for the test.
function renderDetails(loc) {
  const box = $("details"); box.innerHTML = "";
  const row = (table, key, label, value) => {
    const tr = table.insertRow(); tr.dataset.key = key;
    const th = document.createElement("th"); th.textContent = label; tr.appendChild(th);
    const td = tr.insertCell(); td.textContent = String(value);
  };
  const head = document.createElement("table"); head.id = "details-head"; box.appendChild(head);
  row(head, "name", "chosen", loc.name);
  if (loc.kind === "output") {
    row(head, "y_offset", "y offset (NHWC)", loc.y_offset);
    row(head, "im2col_row", "im2col row m", loc.im2col_row);
    for (const [kset, name] of [["numba", "Numba CUDA"], ["cpp", "C++ CUDA"]]) {
      for (const v of ["v1", "v2", "v3"]) {
        const t = loc.cuda[kset][v];
        row(head, `cuda.${kset}.${v}`, `${name} ${VARIANT_LABELS[kset][v]}`, `block (${t.block.join(", ")}), thread (${t.thread.join(", ")})`
            + (t.register ? `, acc[${t.register[0]}][${t.register[1]}]` : "") + (t.note ? ` (${t.note})` : ""));
      }
    }
    const p = loc.cpu;
    row(head, "cpu", `C++ CPU ${VARIANT_LABELS.cpp_cpu} tile`, `row item ${p.row_item}, panel ${p.panel} (filters ${p.panel_filters[0]}..${p.panel_filters[1] - 1}), `
        + `pixel tile ${p.tile} (columns ${p.tile_pixels[0] + 1}..${p.tile_pixels[1]}, ${p.tile_shape[0]}×${p.tile_shape[1]} zmm), `
        + `register row ${p.register_row}, zmm ${p.zmm}, lane ${p.lane}` + (p.note ? ` (${p.note})` : ""));
  } else {
    const key = loc.kind === "input" ? "x_offset" : "w_offset";
    row(head, key, loc.kind === "input" ? "x offset (NHWC)" : "w offset (HWIO)", loc[key]);
  }
  const keys = ["x_offset", "w_offset", "dy_offset", "im2col_col"].filter(k => loc.terms.length && k in loc.terms[0]);
  const terms = document.createElement("table"); terms.id = "details-terms";
  const hr = terms.insertRow(); ["term", ...keys.map(k => k.replace("_", " ").replace("dy", "dO"))].forEach(t => { const th = document.createElement("th"); th.textContent = t; hr.appendChild(th); });
  for (const t of loc.terms) {
    const tr = terms.insertRow(); tr.dataset.label = t.label;
    tr.insertCell().textContent = t.label;
    keys.forEach(k => { const td = tr.insertCell(); td.dataset.key = k; td.textContent = String(t[k]); });
  }
  box.appendChild(terms);
}

function renderArithmetic() {
  const box = $("arithmetic"); box.innerHTML = "";
  for (const ax of arithmetic(state.g)) {
    const h = document.createElement("h3");
    h.textContent = `${ax.axis}: i = ${ax.i}, k = ${ax.k}, s = ${ax.s}, p = ${ax.p_before}` + (ax.p_after !== ax.p_before ? `+${ax.p_after}` : "") + `, d = ${ax.d}`;
    box.appendChild(h);
    const ul = document.createElement("ul");
    for (const r of ax.relations) {
      const li = document.createElement("li"); li.dataset.axis = ax.axis; li.dataset.name = r.name;
      if (r.this) li.className = "this";
      li.textContent = `${r.name}: ${r.formula} → ${r.text}`; ul.appendChild(li);
    }
    const li = document.createElement("li"); li.className = "transposed"; li.dataset.axis = ax.axis; li.textContent = ax.transposed.text; ul.appendChild(li);
    box.appendChild(ul);
  }
}
function renderCode() {
  $("code-keras").textContent = kerasCode(state.g);
  $("code-torch").textContent = torchCode(state.g);
  const g = state.g;
  $("shapes").textContent = `Keras (channels_last): (1, ${g.out_h}, ${g.out_w}, ${g.filters}); PyTorch (NCHW): (1, ${g.filters}, ${g.out_h}, ${g.out_w})`;
}

// The step control: slide the window output by output (as conv_arithmetic's animations do).
function step(i) { const g = state.g; select({ kind: "output", f: state.f, oh: Math.floor(i / g.out_w), ow: i % g.out_w }); }
function play() {
  if (state.timer) { stop(); return; }
  $("play").textContent = "pause"; state.pinned = false;
  state.timer = setInterval(() => { const n = state.g.out_h * state.g.out_w; step((Number($("step").value) + 1) % n); }, PLAY_MS);
}
function stop() { if (state.timer) clearInterval(state.timer); state.timer = null; $("play").textContent = "play"; }

window.addEventListener("DOMContentLoaded", () => {
  writeControls(INITIAL);
  document.querySelectorAll("#controls input, #controls select").forEach(e => e.addEventListener("change", recompute));
  $("filter-pick").addEventListener("change", () => { state.f = Number($("filter-pick").value); state.c = groupChannels(state.g, state.f)[0]; renderSummary(); step(0); });
  $("channel-pick").addEventListener("change", () => { state.c = Number($("channel-pick").value); select(state.sel); });
  $("step").addEventListener("input", () => { stop(); step(Number($("step").value)); });
  $("play").addEventListener("click", play);
  recompute();
});

// For readers (and the browser test): the maps, callable from the console.
window.dlconv = { geometry, forward, reverse, weightGrad, arithmetic, locateOutput, locateInput, locateWeight,
                  cudaThreads, cpuTile, kerasCode, torchCode, explainAt, select, state };
