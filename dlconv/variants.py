"""The conv kernel variants: one naming scheme and one table per kernel set.

Names are ``{cpu,cuda}_v{N}_{technique}``.  v1 is the naive / portable baseline of its set;
a higher number adds a technique; the technique word says what the kernel does and means the
same thing in every set:

=========  =====================================================================================
direct     the defining sum: one output (or one dx / dw element, or one output row) per thread or
           loop iteration, no tiling beyond a vector of filters
packgemm   implicit GEMM on packed (gathered) A tiles with a portable C++ microkernel
regblock   implicit GEMM on the operands in place, each thread owning a register block of outputs
smalltile  regblock's in-place implicit GEMM on a smaller register tile (8 pixels x 16/32 filters)
           for few filters and narrow outputs
halotile   the direct sum from shared memory: an output patch's input tile with its halo staged
gemmtile   implicit GEMM on 16x16 shared-memory tiles of A and w, one output per thread
subpixel   backward-data as one forward conv of dz per stride phase
winograd   Winograd minimal filtering
=========  =====================================================================================

The four kernel sets and where their table is defined (once):

* Numba CPU and Numba CUDA (``kernels/``): :data:`NUMBA_CPU`, :data:`NUMBA_CUDA` below (plain
  Python, so listing them imports no Numba).
* C++ CPU and C++ CUDA (``csrc/``): ``csrc/conv_variants.h``, exported through pybind11 as
  ``dlconv._C.CONV_VARIANTS`` and ``dlconv._C_cuda.CONV_VARIANTS`` (also
  ``dlconv._C.CUDA_CONV_VARIANTS``) and turned into :class:`Variant` records by
  :func:`from_cpp` in :mod:`dlconv.backends.cpp_backend`.

The backends, ``dlconv bench``, ``dlconv info`` and :mod:`dlconv.locate` read these tables.
The names of the previous release (``cpu_gemm``, ``v3_implicit_gemm``, ...) are each entry's
``aliases``: :func:`canonical` accepts them for one release with a ``DeprecationWarning``
naming the new name.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

__all__ = ["Variant", "NUMBA_CPU", "NUMBA_CUDA", "TECHNIQUES", "PASSES", "NAME_RE", "from_cpp",
           "names", "forward_names", "forward_by_number", "aliases", "by_name", "canonical", "canonical_any"]

#: The passes a variant may serve.
PASSES = ("forward", "backward-data", "backward-filter")
#: The technique words of the scheme (the table above).
TECHNIQUES = ("direct", "packgemm", "regblock", "smalltile", "halotile", "gemmtile", "subpixel",
              "winograd")
#: Every variant name matches this.
NAME_RE = re.compile(r"^(cpu|cuda)_v([1-9][0-9]*)_([a-z0-9]+)$")


@dataclass(frozen=True)
class Variant:
    """One kernel variant of one kernel set."""

    name: str                  #: ``{cpu,cuda}_v{N}_{technique}``
    number: int                #: N: its place in the set's progression (1 = the baseline)
    technique: str             #: one word of :data:`TECHNIQUES`
    passes: Tuple[str, ...]    #: which of :data:`PASSES` it serves
    applies: str               #: which geometries (and builds) it can run
    default: str               #: when the dispatch picks it with no variant asked for
    description: str           #: one line: what it does
    source: str = ""           #: the module / file that implements it
    code: int = -1             #: the C++ forward launcher's code (-1: not selectable / Numba)
    aliases: Tuple[str, ...] = ()  #: names of the previous release (deprecated)

    @property
    def device(self) -> str:
        return self.name.split("_", 1)[0]


def from_cpp(rows: Iterable[dict]) -> Tuple[Variant, ...]:
    """The records of a C++ table as exported by the bindings (``_C.CONV_VARIANTS``)."""
    return tuple(Variant(name=r["name"], number=int(r["number"]), technique=r["technique"],
                         passes=tuple(r["passes"]), applies=r["applies"], default=r["default"],
                         description=r["description"], source=r.get("source", ""),
                         code=int(r["code"]), aliases=tuple(r["aliases"])) for r in rows)


#: Numba CPU (kernels/conv2d_cpu.py, kernels/conv2d_cpu_small.py).  Grouped geometries
#: (groups > 1) run kernels/conv2d_grouped_cpu.py whatever the variant.
NUMBA_CPU: Tuple[Variant, ...] = (
    Variant("cpu_v1_direct", 1, "direct", PASSES,
            "any geometry",
            "backward-filter when the filter count is not a multiple of MICRO_NR and neither "
            "the channel-blocked nor the row-segment tile applies (the gather form of backward-data is kept as "
            "conv2d_cpu.backward_data_gather for tests)",
            "one prange iteration per output row (dx row, dw channel block), one pixel at a time, "
            "a vector of filters as accumulator; taps outside the input skipped by one guard",
            "conv2d_cpu", aliases=("cpu_direct",)),
    Variant("cpu_v2_regblock", 2, "regblock", PASSES,
            "any geometry (backward-data: stride 1, pads <= the dilated kernel, more than "
            "NARROW_MAX_C dx channels, where cpu_v3_smalltile does not take it; "
            "backward-filter: filters a multiple of MICRO_NR, or the channel-blocked split-K "
            "tile of backward_filter_tiled, or its row-segment form for few input channels)",
            "forward with more than SMALL_TILE_MAX_FILTERS filters; the backward passes it applies to",
            "implicit GEMM on NHWC/HWIO in place, 6 pixels x 64 filters (12 x 32 for <= 32 filters) "
            "in 24 f32x16 register accumulators",
            "conv2d_cpu", aliases=("cpu_gemm",)),
    Variant("cpu_v3_smalltile", 3, "smalltile", ("forward", "backward-data"),
            "any geometry (backward-data: stride 1, pads <= the dilated kernel, at most 32 dx channels)",
            "forward with at most SMALL_TILE_MAX_FILTERS filters; backward-data at stride 1 "
            "into 9-16 dx channels, and into 17-32 where its overlapping last block costs less "
            "than the 12 x 32 tile's one-pixel ragged edge (conv2d_cpu._small_tile_beats_narrow)",
            "implicit GEMM on an 8-pixel x 16/32-filter register tile (few filters, narrow outputs)",
            "conv2d_cpu_small", aliases=("cpu_v3_gemm_small",)),
    Variant("cpu_v2_subpixel", 2, "subpixel", ("backward-data",),
            "any ungrouped geometry",
            "backward-data with stride > 1, a crop (pads beyond the dilated kernel), or at most "
            "NARROW_MAX_C dx channels",
            "dx as stride-1 forwards of dz, one per stride phase (dlconv.shapes.transposed_phases), "
            "on the forward's inner kernels, then one scatter; a pixel-vectorised narrow kernel "
            "for <= NARROW_MAX_C channels",
            "conv2d_subpixel_cpu"),
)

#: Numba CUDA (kernels/conv2d_cuda.py forward, kernels/conv2d_backward_cuda.py backward).
NUMBA_CUDA: Tuple[Variant, ...] = (
    Variant("cuda_v1_direct", 1, "direct", PASSES,
            "any geometry (the only forward for groups > 1)",
            "backward-data and backward-filter; forward of grouped geometries",
            "one thread per output element (forward, dx: gather) or per dw element and pixel chunk "
            "(deterministic split reduction)",
            "conv2d_cuda", aliases=("v1_direct",)),
    Variant("cuda_v2_halotile", 2, "halotile", ("forward",),
            "groups = 1 and a single-channel halo tile that fits shared memory",
            "never (a step of the progression)",
            "a 4x4-pixel x 8-filter output patch per block; its input tile with halo and the filter "
            "slice staged in shared memory, one output per thread",
            "conv2d_cuda", aliases=("v2_smem_tiled",)),
    Variant("cuda_v3_regblock", 3, "regblock", ("forward",),
            "any geometry with groups = 1",
            "forward (groups = 1)",
            "implicit GEMM, 32x32 block tile, 4x4 register block per thread, BK=8 shared-memory slices",
            "conv2d_cuda", aliases=("v3_implicit_gemm",)),
)


def names(table: Sequence[Variant]) -> Tuple[str, ...]:
    return tuple(v.name for v in table)


def forward_names(table: Sequence[Variant], source: Optional[str] = None) -> Tuple[str, ...]:
    """Names of the entries that serve the forward pass (and are implemented in ``source``)."""
    return tuple(v.name for v in table
                 if "forward" in v.passes and (source is None or v.source == source))


def forward_by_number(table: Sequence[Variant], source: Optional[str] = None) -> Tuple[str, ...]:
    """:func:`forward_names`, highest number (the furthest step of the progression) first."""
    number = {v.name: v.number for v in table}
    return tuple(sorted(forward_names(table, source), key=lambda n: -number[n]))


def by_name(table: Sequence[Variant]) -> Dict[str, Variant]:
    return {v.name: v for v in table}


def aliases(table: Sequence[Variant]) -> Dict[str, str]:
    """Old name → new name."""
    return {old: v.name for v in table for old in v.aliases}


def canonical(name: str, table: Sequence[Variant], where: str = "", stacklevel: int = 3) -> str:
    """``name`` if it is in ``table``; an old name's new name, with a DeprecationWarning;
    otherwise ValueError naming the valid ones."""
    if any(v.name == name for v in table):
        return name
    new = aliases(table).get(name)
    if new is not None:
        warnings.warn(f"conv variant {name!r} is deprecated and will be removed in the next release; "
                      f"it is now called {new!r}", DeprecationWarning, stacklevel=stacklevel)
        return new
    raise ValueError(f"variant must be one of {names(table)}{' ' + where if where else ''}, got {name!r}")


def canonical_any(name: str, tables: Iterable[Sequence[Variant]]) -> str:
    """:func:`canonical` without a warning, over several tables (for historical results): the
    new name of an old one, ``name`` itself otherwise."""
    for table in tables:
        new = aliases(table).get(name)
        if new is not None:
            return new
    return name
