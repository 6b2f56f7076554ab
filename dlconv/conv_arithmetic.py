"""conv_arithmetic's relationships (Dumoulin & Visin, "A guide to convolution arithmetic for
deep learning", 2016) worked out for one geometry: what ``dlconv explain`` prints at its end,
``--json`` holds under ``arithmetic`` and the ``--html`` page lists (its script's
``arithmetic`` mirrors this function string for string).

Per axis, with i the input size, k the kernel, s the stride, p the padding (P = before +
after, 2p when symmetric) and d the dilation:

* dilation's effective kernel ``k̂ = k + (k − 1)(d − 1)``;
* no padding, unit stride ``o = i − k̂ + 1``; zero padding ``o = i − k̂ + 2p + 1``; half (same)
  padding ``p = ⌊k̂/2⌋, o = i``; full padding ``p = k̂ − 1, o = i + k̂ − 1``; stride
  ``o = ⌊(i − k̂)/s⌋ + 1``; in general ``o = ⌊(i + 2p − k̂)/s⌋ + 1`` (checked against
  dlconv.shapes);
* the transposed convolution (from o back to i) as a direct one: s − 1 zeros between the o
  inputs, ``a = (i + 2p − k̂) mod s`` zeros more at the end, kernel ``k′ = k̂`` (flipped),
  stride ``s′ = 1``, padding ``p′ = k̂ − 1 − p`` per side (a negative p′ crops):
  ``o′ = s(i′ − 1) + a + k̂ − 2p = i``.
"""

from __future__ import annotations

from typing import List

from .shapes import ConvGeometry

__all__ = ["arithmetic"]


def arithmetic(g: ConvGeometry) -> List[dict]:
    """conv_arithmetic's relationships (Dumoulin & Visin, "A guide to convolution arithmetic
    for deep learning") for this geometry, one record per axis: the output size under no,
    zero, half (same) and full padding with unit and non-unit strides, dilation's effective
    kernel k̂ = k + (k − 1)(d − 1), and the transposed convolution as a direct one: s − 1 zeros
    inserted between the inputs, a = (i + P − k̂) mod s extra zeros at the end, kernel k′ = k̂,
    stride s′ = 1, padding p′ = k̂ − 1 − p on each side (P = p_before + p_after)."""
    axes = []
    for axis, i, k, s, d, pb, pa, o in (
            ("height", g.in_h, g.k_h, g.stride_h, g.dil_h, g.pad_top, g.pad_bottom, g.out_h),
            ("width", g.in_w, g.k_w, g.stride_w, g.dil_w, g.pad_left, g.pad_right, g.out_w)):
        kh = k + (k - 1) * (d - 1)
        P = pb + pa
        ptxt = f"2·{pb}" if pb == pa else f"{pb} + {pa}"
        rel = []

        def add(name, formula, text, value, this):
            rel.append({"name": name, "formula": formula, "text": text, "value": value, "this": this})

        add("dilation: effective kernel", "k̂ = k + (k − 1)(d − 1)",
            f"k̂ = {k} + ({k} − 1)·({d} − 1) = {kh}", kh, d > 1)
        v = i - kh + 1
        add("no padding, unit stride", "o = (i − k̂) + 1", f"o = ({i} − {kh}) + 1 = {v}",
            v if v >= 1 else None, P == 0 and s == 1)
        v = i - kh + P + 1
        add("zero padding, unit stride", "o = (i − k̂) + 2p + 1",
            f"o = ({i} − {kh}) + {ptxt} + 1 = {v}", v if v >= 1 else None, P > 0 and s == 1)
        if kh % 2:
            add("half (same) padding, unit stride", "p = ⌊k̂/2⌋, o = i",
                f"p = ⌊{kh}/2⌋ = {kh // 2}, o = {i}", i, s == 1 and pb == pa == kh // 2)
        else:
            add("half (same) padding, unit stride", "p = ⌊k̂/2⌋, o = i (k̂ odd)",
                f"k̂ = {kh} is even: no symmetric half padding ('same' pads {kh - 1} split "
                f"{(kh - 1) // 2} before, {kh - 1 - (kh - 1) // 2} after)", None, False)
        add("full padding, unit stride", "p = k̂ − 1, o = i + (k̂ − 1)",
            f"p = {kh - 1}, o = {i} + ({kh} − 1) = {i + kh - 1}", i + kh - 1,
            s == 1 and pb == pa == kh - 1)
        v = (i - kh) // s + 1 if i >= kh else None
        add("no padding, stride s", "o = ⌊(i − k̂)/s⌋ + 1",
            f"o = ⌊({i} − {kh})/{s}⌋ + 1 = {v}" if v else f"i = {i} < k̂ = {kh}: no output",
            v, P == 0 and s > 1)
        v = (i + P - kh) // s + 1
        add("padding and stride (general)", "o = ⌊(i + 2p − k̂)/s⌋ + 1",
            f"o = ⌊({i} + {ptxt} − {kh})/{s}⌋ + 1 = {v}", v, True)
        if v != o:
            raise RuntimeError(f"conv_arithmetic's o = {v} disagrees with dlconv.shapes ({o})")
        a = (i + P - kh) % s
        ip = o
        stretched = (ip - 1) * s + 1
        pbp, pap = kh - 1 - pb, kh - 1 - pa
        op = s * (ip - 1) + a + kh - P
        if op != i:
            raise RuntimeError(f"conv_arithmetic's transposed o′ = {op} is not the input size {i}")
        trans = {"i_prime": ip, "k_prime": kh, "s_prime": 1, "p_prime_before": pbp, "p_prime_after": pap,
                 "a": a, "zeros_between": s - 1, "stretched": stretched, "o_prime": op,
                 "text": (f"transposed: i′ = {ip} (this output), {s - 1} zero(s) between inputs → "
                          f"{stretched}, a = (i + 2p − k̂) mod s = ({i} + {ptxt} − {kh}) mod {s} = {a} "
                          f"extra at the end; direct conv with k′ = {kh}, s′ = 1, p′ = k̂ − 1 − p = "
                          + (f"{pbp}" if pbp == pap else f"{pbp} before, {pap} after")
                          + f": o′ = s(i′ − 1) + a + k̂ − 2p = {s}·({ip} − 1) + {a} + {kh} − "
                            f"{'2·' + str(pb) if pb == pa else str(P)} = {op}"
                          + (" (p′ < 0: crop instead of pad)" if min(pbp, pap) < 0 else ""))}
        axes.append({"axis": axis, "i": i, "k": k, "s": s, "d": d, "p_before": pb, "p_after": pa,
                     "k_hat": kh, "o": o, "relations": rel, "transposed": trans})
    return axes
