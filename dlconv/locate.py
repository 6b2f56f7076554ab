"""Where one convolution term lives: memory offsets, the im2col (implicit GEMM) view, and
which thread / block / register tile of each kernel computes an output (teaching).

``dlconv explain --at`` and the ``--html`` page show these; the page's script mirrors the
functions below line for line, and tests/test_explain_html.py checks the two against each
other in a real browser.

Layouts (the kernels'): x NHWC, w HWIO with I = C/G (stock Keras' grouped kernel), y NHWC::

    x offset  = ((n·H + ih)·W + iw)·C + c
    w offset  = ((kh·KW + kw)·(C/G) + ci)·F + k       ci = c − group(k)·(C/G)
    y offset  = ((n·OH + oh)·OW + ow)·F + k

im2col: the forward is ``Y[M, F] = A[M, R] @ W[R, F]`` (per group), row m = (n·OH + oh)·OW + ow
(one output pixel), column r = (kh·KW + kw)·(C/G) + ci (one tap and channel), the row of HWIO
weights viewed as (R, F).

The launch constants below are the kernels' own; they are copied here (the Numba module
imports numba.cuda, the C++ ones are compiled in) and tests/test_explain_html.py parses
kernels/conv2d_cuda.py, csrc/cuda_conv.cu, csrc/cuda_common.cuh and csrc/cpu_conv_direct.h to
check each value, so a retuned kernel fails that test until this table follows.
"""

from __future__ import annotations

from typing import Dict

__all__ = ["KERNEL_CONSTANTS", "VARIANT_LABELS", "variant_labels", "x_offset", "w_offset", "y_offset", "im2col", "cuda_threads",
           "cpu_tile", "locate_output"]

#: The launch constants of the kernels that compute a forward output, by source file.
KERNEL_CONSTANTS: Dict[str, Dict[str, int]] = {
    # kernels/conv2d_cuda.py (Numba CUDA)
    "numba_cuda": {"V1_THREADS": 128, "V2_TILE_H": 4, "V2_TILE_W": 4, "V2_TILE_K": 8,
                   "V2_SMEM_X": 4096, "V2_SMEM_W": 4096,
                   "V3_BM": 32, "V3_BN": 32, "V3_BK": 8, "V3_TM": 4, "V3_TN": 4},
    # csrc/cuda_conv.cu and csrc/cuda_common.cuh (C++ CUDA)
    "cpp_cuda": {"THREADS_1D": 256, "MAX_BLOCKS_1D": 1 << 20, "V2_TILE": 16,
                 "V3_BM": 64, "V3_BN": 64, "V3_BK": 16, "V3_TM": 4, "V3_TN": 4},
    # csrc/cpu_conv_direct.h (C++ CPU, AVX-512 cpu_v2_regblock): 16 floats per zmm, at most 4 zmm
    # (64 filters) per register row; max_rows(nv) pixels per register block.
    "cpp_cpu": {"VL": 16, "MAX_NV": 4, "MAX_R": 12},
}


def variant_labels() -> Dict[str, object]:
    """The variant names the page and ``dlconv explain --at`` print, read from the variant
    tables (:mod:`dlconv.variants`; the C++ ones from ``dlconv._C`` when it is built, else the
    bare ``cuda_v{N}``): ``{"numba": {"v1": name, ...}, "cpp": {...}, "cpp_cpu": name}``."""
    from . import variants

    def by_number(table, fallback):
        got = {f"v{v.number}": v.name for v in table if "forward" in v.passes}
        return {k: got.get(k, f"{fallback}_{k}") for k in ("v1", "v2", "v3")}
    cpp_cuda, cpp_cpu = (), ()
    try:
        from ._C import CONV_VARIANTS, CUDA_CONV_VARIANTS
        cpp_cuda, cpp_cpu = variants.from_cpp(CUDA_CONV_VARIANTS), variants.from_cpp(CONV_VARIANTS)
    except ImportError:  # not built: the bare numbers
        pass
    return {"numba": by_number(variants.NUMBA_CUDA, "cuda"), "cpp": by_number(cpp_cuda, "cuda"),
            "cpp_cpu": next((v.name for v in cpp_cpu if v.technique == "regblock"), "cpu_v2")}


#: :func:`variant_labels`, computed once.
VARIANT_LABELS = variant_labels()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _groups(g) -> int:
    return getattr(g, "groups", 1)


def x_offset(g, n: int, ih: int, iw: int, c: int) -> int:
    """Flat NHWC offset of x[n, ih, iw, c] (0-based)."""
    return ((n * g.in_h + ih) * g.in_w + iw) * g.in_c + c


def w_offset(g, kh: int, kw: int, ci: int, k: int) -> int:
    """Flat HWIO offset of w[kh, kw, ci, k]; ci is the channel within filter k's group."""
    return ((kh * g.k_w + kw) * (g.in_c // _groups(g)) + ci) * g.filters + k


def y_offset(g, n: int, oh: int, ow: int, k: int) -> int:
    """Flat NHWC offset of y[n, oh, ow, k]."""
    return ((n * g.out_h + oh) * g.out_w + ow) * g.filters + k


def im2col(g, n: int, oh: int, ow: int, kh: int, kw: int, ci: int):
    """(row, column) of the term in the implicit GEMM A[M, R] of filter's group."""
    return (n * g.out_h + oh) * g.out_w + ow, (kh * g.k_w + kw) * (g.in_c // _groups(g)) + ci


def _numba_v2_refusal(g):
    """Why kernels/conv2d_cuda.py's v2 refuses this geometry (its v2_channel_chunk), or None."""
    K = KERNEL_CONSTANTS["numba_cuda"]
    halo_h = (K["V2_TILE_H"] - 1) * g.stride_h + (g.k_h - 1) * g.dil_h + 1
    halo_w = (K["V2_TILE_W"] - 1) * g.stride_w + (g.k_w - 1) * g.dil_w + 1
    cc = min(g.in_c, K["V2_SMEM_X"] // (halo_h * halo_w), K["V2_SMEM_W"] // (g.k_h * g.k_w * K["V2_TILE_K"]))
    if cc < 1:
        return f"refused: the {halo_h}x{halo_w} halo does not fit shared memory (use v3)"
    return None


def cuda_threads(g, n: int, oh: int, ow: int, k: int) -> Dict[str, Dict[str, dict]]:
    """Which block and thread of each CUDA forward variant computes y[n, oh, ow, k].

    ``block`` is blockIdx as (x, y), ``thread`` threadIdx as (x, y); ``register`` the
    accumulator acc[i][j] of v3's per-thread tile; grouped geometries run v1 in both sets.
    """
    m = (n * g.out_h + oh) * g.out_w + ow
    F = g.filters
    idx = m * F + k                                   # v1's flat element index, k fastest
    grouped = _groups(g) != 1
    note_grouped = "grouped: runs " + VARIANT_LABELS["numba"]["v1"]

    K = KERNEL_CONSTANTS["numba_cuda"]
    nb = {"v1": {"block": [idx // K["V1_THREADS"], 0], "thread": [idx % K["V1_THREADS"], 0],
                 "register": None, "note": ""}}
    tiles_w = _cdiv(g.out_w, K["V2_TILE_W"])
    tiles = _cdiv(g.out_h, K["V2_TILE_H"]) * tiles_w
    ty, tx, kk = oh % K["V2_TILE_H"], ow % K["V2_TILE_W"], k % K["V2_TILE_K"]
    nb["v2"] = {"block": [n * tiles + (oh // K["V2_TILE_H"]) * tiles_w + ow // K["V2_TILE_W"],
                          k // K["V2_TILE_K"]],
                "thread": [(ty * K["V2_TILE_W"] + tx) * K["V2_TILE_K"] + kk, 0],
                "register": None, "note": note_grouped if grouped else (_numba_v2_refusal(g) or "")}
    ml, kl = m % K["V3_BM"], k % K["V3_BN"]
    tr, tc = ml // K["V3_TM"], kl // K["V3_TN"]
    nb["v3"] = {"block": [m // K["V3_BM"], k // K["V3_BN"]],
                "thread": [tr * (K["V3_BN"] // K["V3_TN"]) + tc, 0],
                "register": [ml % K["V3_TM"], kl % K["V3_TN"]], "note": note_grouped if grouped else ""}

    C = KERNEL_CONSTANTS["cpp_cuda"]
    t1 = C["THREADS_1D"]
    grid = min(max(_cdiv(g.batch * g.out_h * g.out_w * F, t1), 1), C["MAX_BLOCKS_1D"])
    slot = idx % (grid * t1)                         # grid-stride loop: pass idx // (grid·t1)
    cc = {"v1": {"block": [slot // t1, 0], "thread": [slot % t1, 0], "register": None,
                 "note": f"grid-stride pass {idx // (grid * t1)}" if idx >= grid * t1 else ""}}
    cc["v2"] = {"block": [m // C["V2_TILE"], k // C["V2_TILE"]],
                "thread": [k % C["V2_TILE"], m % C["V2_TILE"]], "register": None,
                "note": note_grouped if grouped else ""}
    ml, kl = m % C["V3_BM"], k % C["V3_BN"]
    ty3, tx3 = ml // C["V3_TM"], kl // C["V3_TN"]
    cc["v3"] = {"block": [m // C["V3_BM"], k // C["V3_BN"]],
                "thread": [ty3 * (C["V3_BN"] // C["V3_TN"]) + tx3, 0],
                "register": [ml % C["V3_TM"], kl % C["V3_TN"]], "note": note_grouped if grouped else ""}
    return {"numba": nb, "cpp": cc}


def _max_rows(nv: int) -> int:
    """csrc/cpu_conv_direct.h's max_rows: R·NV <= 24 zmm accumulators, 12 rows at most."""
    return 6 if nv >= 4 else 8 if nv == 3 else 12


def cpu_tile(g, n: int, oh: int, ow: int, k: int) -> dict:
    """The register tile of the C++ CPU register-block kernel (csrc/cpu_conv_direct.h) holding
    y[n, oh, ow, k]: OpenMP work item (one output row), 64-filter column panel, pixel tile
    of that row (OW split into ceil(OW/R) near-equal tiles), and its register row / zmm / lane."""
    K = KERNEL_CONSTANTS["cpp_cpu"]
    panel_w = K["MAX_NV"] * K["VL"]
    f0 = (k // panel_w) * panel_w
    nv = _cdiv(min(panel_w, g.filters - f0), K["VL"])
    R = _max_rows(nv)
    ntile = _cdiv(g.out_w, R)
    tile = next(i for i in range(ntile) if i * g.out_w // ntile <= ow < (i + 1) * g.out_w // ntile)
    ow0, ow1 = tile * g.out_w // ntile, (tile + 1) * g.out_w // ntile
    return {"row_item": n * g.out_h + oh, "panel": k // panel_w, "panel_filters": [f0, f0 + nv * K["VL"]],
            "tile": tile, "tile_pixels": [ow0, ow1], "tile_shape": [ow1 - ow0, nv],
            "register_row": ow - ow0, "zmm": (k - f0) // K["VL"], "lane": (k - f0) % K["VL"],
            "note": "grouped: cpu_conv_grouped.cpp, not this tile" if _groups(g) != 1 else ""}


def locate_output(g, f: int, oh: int, ow: int, n: int = 0) -> dict:
    """Everything above for output y[n, oh, ow, f] (0-based), as plain data."""
    return {"y_offset": y_offset(g, n, oh, ow, f), "im2col_row": im2col(g, n, oh, ow, 0, 0, 0)[0],
            "cuda": cuda_threads(g, n, oh, ow, f), "cpu": cpu_tile(g, n, oh, ow, f)}
