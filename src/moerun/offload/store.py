"""Where each routed expert's bytes lie in a checkpoint's files, and reading one expert into a cache slot.

An expert of a layer is a handful of contiguous tensors ("parts"): its gate/up and down matrices, each a
float matrix or a low-bit one (packed values, scales, mins). The model is built as for a resident load,
with uninitialised storage that is never touched; each checkpoint tensor is matched with the storage it
would fill, and the byte ranges of that storage belonging to each expert's parts become file ranges
("pieces"). This covers every layout the loader reads (one tensor per expert and projection, fused
[E, 2I, H] stacks, moerun's per-format low-bit stacks) without naming any of them here.

A slot holds one expert: its parts one after another, each 64-byte aligned. With ``bypass_page_cache``
(the default of an offloaded load) every miss really reads storage: reads use direct I/O (``O_DIRECT``),
which moves whole aligned blocks by DMA into a page-aligned scratch buffer of each reading thread, the
wanted bytes then copied into the slot. Measured on this project's 2-core host, that reads storage 1.5-2x
faster than buffered reads and costs a tenth of their CPU time (0.05 against 0.46 ms per MB), which a
background prefetch would otherwise take from the computation. A file system without direct I/O (tmpfs)
gets buffered ``os.preadv`` reads straight into the slot, each range dropped from the OS page cache right
after (``posix_fadvise(DONTNEED)``); so do all reads without ``bypass_page_cache``, minus the dropping. The
store times its reads to report the storage bandwidth. Each expert read is checked for NaN and infinities (a
resident load checks every weight as it reads it), and each part of an expert must be filled by exactly one
checkpoint range.
"""

from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..kernels.finite import all_finite
from ..layer import MoELayer
from ..quant.formats import QuantizedWeight

_ALIGN = 64
# Direct reads start and end on this boundary: a multiple of every device's logical block size.
_DIRECT_BLOCK = 4096
# Bytes one direct read moves at most, the size of each reading thread's scratch buffer.
_DIRECT_CHUNK = 4 << 20
# Pieces of an expert this close in a file are read as one span: a direct read of a few blocks more costs less
# than another request (an expert stored as separate gate, up and down tensors lies in one stretch).
_MERGE_GAP = 64 << 10


def matrix_parts(matrix: torch.Tensor | QuantizedWeight) -> list[torch.Tensor]:
    """The contiguous tensors a matrix is stored in (itself, or packed values, scales and mins)."""
    return [matrix] if isinstance(matrix, torch.Tensor) else list(matrix.tensors().values())


def matrix_like(template: torch.Tensor | QuantizedWeight, parts: list[torch.Tensor]) -> torch.Tensor | QuantizedWeight:
    """A matrix of ``template``'s format and shape over other storage ``parts`` (as ``matrix_parts`` lists)."""
    if isinstance(template, torch.Tensor):
        return parts[0]
    mins = parts[2] if template.mins is not None else None
    return QuantizedWeight(template.format, parts[0], parts[1], mins, template.in_features)


def meta_like(matrix: torch.Tensor | QuantizedWeight) -> torch.Tensor | QuantizedWeight:
    """A matrix of the same shape, dtype and format with no storage."""
    return matrix_like(matrix, [t.detach().to("meta") for t in matrix_parts(matrix)])


@dataclass(frozen=True)
class Piece:
    """A byte range of a checkpoint file that fills elements [start, start + count) of one part."""

    file: Path
    offset: int
    part: int
    start: int
    count: int
    dtype: torch.dtype  # as stored in the file
    slot_dtype: torch.dtype  # as the slot holds it
    slot_offset: int  # byte offset in the slot of element ``start``

    @property
    def nbytes(self) -> int:
        return self.count * self.dtype.itemsize

    @property
    def converted(self) -> bool:
        return self.dtype != self.slot_dtype


@dataclass(frozen=True)
class Span:
    """One read: a byte range of a file covering some of an expert's pieces (and the gaps between them)."""

    file: Path
    offset: int
    nbytes: int
    pieces: tuple[Piece, ...]


def merge_pieces(pieces: list[Piece], max_gap: int, max_span: int) -> list[Span]:
    """Pieces sorted by (file, offset) as spans: neighbours in a file merge while the gap between them is at most
    ``max_gap`` bytes and the span at most ``max_span``; a converted piece (read into a buffer) stays alone."""
    spans: list[Span] = []
    for piece in pieces:
        last = spans[-1] if spans else None
        end = piece.offset + piece.nbytes
        if (
            last is not None
            and not piece.converted
            and not last.pieces[-1].converted
            and last.file == piece.file
            and 0 <= piece.offset - (last.offset + last.nbytes) <= max_gap
            and end - last.offset <= max_span
        ):
            spans[-1] = Span(last.file, last.offset, end - last.offset, (*last.pieces, piece))
        else:
            spans.append(Span(piece.file, piece.offset, piece.nbytes, (piece,)))
    return spans


@dataclass(frozen=True)
class ExpertLayout:
    """The parts of one expert as laid out in a slot: gate/up parts first, then down parts."""

    templates: tuple[torch.Tensor | QuantizedWeight, torch.Tensor | QuantizedWeight]  # gate_up, down; no storage
    shapes: tuple[tuple[torch.dtype, tuple[int, ...]], ...]
    offsets: tuple[int, ...]  # byte offset of each part in the slot
    nbytes: int  # slot bytes used

    @classmethod
    def of(cls, gate_up: torch.Tensor | QuantizedWeight, down: torch.Tensor | QuantizedWeight) -> ExpertLayout:
        parts = matrix_parts(gate_up) + matrix_parts(down)
        offsets, at = [], 0
        for t in parts:
            offsets.append(at)
            at += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        shapes = tuple((t.dtype, tuple(t.shape)) for t in parts)
        return cls((meta_like(gate_up), meta_like(down)), shapes, tuple(offsets), at)

    def views(self, slot: torch.Tensor) -> list[torch.Tensor]:
        """The parts as tensors over a uint8 slot."""
        out = []
        for (dtype, shape), offset in zip(self.shapes, self.offsets, strict=True):
            count = max(1, int(torch.Size(shape).numel()))
            out.append(slot[offset : offset + count * dtype.itemsize].view(dtype).view(shape))
        return out

    def matrices(self, slot: torch.Tensor) -> tuple[torch.Tensor | QuantizedWeight, torch.Tensor | QuantizedWeight]:
        """(gate_up, down) of the expert held in ``slot``."""
        views = self.views(slot)
        split = len(matrix_parts(self.templates[0]))
        return matrix_like(self.templates[0], views[:split]), matrix_like(self.templates[1], views[split:])


def _check_tiling(pieces: list[Piece], layout: ExpertLayout, expert: str) -> None:
    """Each part of an expert must be filled exactly once, element by element: counting elements alone would
    take one part filled twice for two parts filled once.

    Raises:
        ValueError: some elements of a part are filled twice, or by nothing.
    """
    for part, (_, shape) in enumerate(layout.shapes):
        at = 0
        for piece in sorted((p for p in pieces if p.part == part), key=lambda p: p.start):
            if piece.start < at:
                raise ValueError(f"the checkpoint fills some of {expert} twice")
            if piece.start > at:
                raise ValueError(f"the checkpoint does not hold all of {expert}")
            at += piece.count
        if at != int(torch.Size(shape).numel()):
            raise ValueError(f"the checkpoint does not hold all of {expert}")


@dataclass
class ReadStats:
    """Bytes read from the checkpoint and the time the reads took (all threads)."""

    bytes: int = 0
    seconds: float = 0.0
    reads: int = 0

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class ExpertStore:
    """The routed experts of a model, left in its checkpoint files.

    Args:
        layers: the model's MoE layers in order, built with their final (possibly low-bit) layout over
            storage that the store only inspects (addresses), never reads.
        destinations: (file, offset, stored dtype, destination tensor) for every checkpoint tensor, the
            destination being the model storage it would fill (elementwise, same numel).
        bypass_page_cache: read storage, not the OS page cache: direct I/O where the file system allows
            it, else buffered reads whose pages are dropped right after.

    Raises:
        ValueError: some expert's storage is not covered by the checkpoint.
    """

    def __init__(
        self,
        layers: list[MoELayer],
        destinations: list[tuple[Path, int, torch.dtype, torch.Tensor]],
        bypass_page_cache: bool = True,
    ) -> None:
        self.bypass_page_cache = bypass_page_cache
        self.layouts: list[list[ExpertLayout]] = []
        self.pieces: list[list[list[Piece]]] = []
        ranges = []  # (start address, end address, layer, expert, part, itemsize)
        for li, layer in enumerate(layers):
            layouts, pieces = [], []
            for e in range(layer.num_experts):
                gate_up, down = layer.resident.gate_up[e], layer.resident.down[e]
                layouts.append(ExpertLayout.of(gate_up, down))
                pieces.append([])
                for pi, part in enumerate(matrix_parts(gate_up) + matrix_parts(down)):
                    start = part.data_ptr()
                    ranges.append((start, start + part.numel() * part.element_size(), li, e, pi, part.element_size()))
            self.layouts.append(layouts)
            self.pieces.append(pieces)
        ranges.sort()
        starts = [r[0] for r in ranges]
        self.consumed: set[int] = set()  # indices of the destinations that hold expert bytes
        for index, (file, offset, stored, dest) in enumerate(destinations):
            lo, hi = dest.data_ptr(), dest.data_ptr() + dest.numel() * dest.element_size()
            i = max(0, bisect.bisect_right(starts, lo) - 1)
            while i < len(ranges) and ranges[i][0] < hi:
                r0, r1, li, e, pi, size = ranges[i]
                a, b = max(lo, r0), min(hi, r1)
                if a < b:
                    first = (a - lo) // size  # element index within the destination
                    start = (a - r0) // size
                    dtype, _ = self.layouts[li][e].shapes[pi]
                    slot_offset = self.layouts[li][e].offsets[pi] + start * size
                    piece = Piece(
                        file, offset + first * stored.itemsize, pi, start, (b - a) // size, stored, dtype, slot_offset
                    )
                    self.pieces[li][e].append(piece)
                    self.consumed.add(index)
                i += 1
        for li, layer_pieces in enumerate(self.pieces):
            for e, expert_pieces in enumerate(layer_pieces):
                _check_tiling(expert_pieces, self.layouts[li][e], f"expert {e} of MoE layer {li}")
                expert_pieces.sort(key=lambda p: (p.file, p.offset))
        self.spans = [[merge_pieces(ps, _MERGE_GAP, _DIRECT_CHUNK) for ps in layer] for layer in self.pieces]
        self.stats = ReadStats()
        self.busy_s = 0.0  # seconds spent reading since the store opened (``stats`` may be reset)
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int | None] = {}  # None: the file system refuses direct I/O
        self._scratch = threading.local()
        self._lock = threading.Lock()

    @property
    def num_layers(self) -> int:
        return len(self.layouts)

    def expert_nbytes(self, layer: int, expert: int) -> int:
        """Slot bytes expert ``expert`` of MoE layer ``layer`` needs."""
        return self.layouts[layer][expert].nbytes

    def slot_nbytes(self) -> int:
        """Bytes of a slot that can hold any expert."""
        return max(lay.nbytes for layouts in self.layouts for lay in layouts)

    def file_nbytes(self, layer: int, expert: int) -> int:
        """Bytes of the checkpoint an expert's read covers."""
        return sum(p.nbytes for p in self.pieces[layer][expert])

    def _fd(self, file: Path) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def _direct_fd(self, file: Path) -> int | None:
        """A direct-I/O descriptor of ``file``, or None where the file system has no direct I/O."""
        with self._lock:
            if file not in self._direct_fds:
                try:
                    self._direct_fds[file] = os.open(file, os.O_RDONLY | os.O_DIRECT)
                except OSError:
                    self._direct_fds[file] = None
            return self._direct_fds[file]

    def _scratch_buffer(self) -> tuple[memoryview, int]:
        """This thread's page-aligned buffer for direct reads, as a memoryview and its address."""
        held = getattr(self._scratch, "buffer", None)
        if held is None:
            memory = mmap.mmap(-1, _DIRECT_CHUNK)
            held = (memoryview(memory), ctypes.addressof(ctypes.c_char.from_buffer(memory)))
            self._scratch.buffer = held
        return held

    def _read_direct(self, fd: int, span: Span, addresses: list[int]) -> int:
        """Read ``span`` from a direct-I/O descriptor, a chunk of whole blocks at a time, copying each of its pieces
        to its address.

        Returns:
            bytes copied: fewer than the pieces hold only where the file ends first.
        """
        view, scratch = self._scratch_buffer()
        at, end, copied = span.offset, span.offset + span.nbytes, 0
        while at < end:
            first = at - at % _DIRECT_BLOCK
            want = min(-(-(end - first) // _DIRECT_BLOCK) * _DIRECT_BLOCK, _DIRECT_CHUNK)
            arrived = min(first + os.preadv(fd, [view[:want]], first), end)
            if arrived <= at:
                break
            for piece, address in zip(span.pieces, addresses, strict=True):
                lo, hi = max(piece.offset, at), min(piece.offset + piece.nbytes, arrived)
                if lo < hi:
                    # memmove, not Tensor.copy_: on the prefetch thread, torch's parallel copy would start a
                    # second OpenMP team that spins on the cores the computation runs on.
                    ctypes.memmove(address + lo - piece.offset, scratch + lo - first, hi - lo)
                    copied += hi - lo
            at = arrived
        return copied

    def _read_buffered(self, span: Span, addresses: list[int]) -> int:
        """Read each piece of ``span`` straight to its address; bytes read."""
        fd = self._fd(span.file)
        got = 0
        for piece, address in zip(span.pieces, addresses, strict=True):
            got += os.preadv(fd, [(ctypes.c_char * piece.nbytes).from_address(address)], piece.offset)
            if self.bypass_page_cache:
                os.posix_fadvise(fd, piece.offset, piece.nbytes, os.POSIX_FADV_DONTNEED)
        return got

    def read(self, layer: int, expert: int, slot: torch.Tensor) -> int:
        """Read expert ``expert`` of MoE layer ``layer`` into ``slot`` (uint8, at least its nbytes).

        Returns:
            bytes of the expert's pieces read from the checkpoint.

        Raises:
            OSError: the checkpoint ends before the expert does.
            CheckpointError: the expert holds NaN or infinite values.
        """
        need = self.layouts[layer][expert].nbytes
        if slot.dtype != torch.uint8 or not slot.is_contiguous() or slot.numel() < need:
            raise ValueError(f"a slot for expert {expert} of MoE layer {layer} must be {need} contiguous bytes or more")
        start = time.perf_counter()
        base = slot.data_ptr()
        total = 0
        for span in self.spans[layer][expert]:
            buffers = [torch.empty(p.nbytes, dtype=torch.uint8) if p.converted else None for p in span.pieces]
            addresses = [
                base + p.slot_offset if b is None else b.data_ptr() for p, b in zip(span.pieces, buffers, strict=True)
            ]
            direct = self._direct_fd(span.file) if self.bypass_page_cache else None
            got = self._read_buffered(span, addresses) if direct is None else self._read_direct(direct, span, addresses)
            if got != sum(p.nbytes for p in span.pieces):
                raise OSError(f"{span.file} is truncated: expert {expert} of MoE layer {layer} could not be read")
            for piece, buffer in zip(span.pieces, buffers, strict=True):
                if buffer is not None:
                    dest = self.layouts[layer][expert].views(slot)[piece.part].view(-1)
                    dest[piece.start : piece.start + piece.count].copy_(buffer.view(piece.dtype))
            total += got
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.bytes += total
            self.stats.seconds += seconds
            self.stats.reads += 1
            self.busy_s += seconds
        self._check_finite(layer, expert, slot)
        return total

    def _check_finite(self, layer: int, expert: int, slot: torch.Tensor) -> None:
        """Refuse an expert read with NaN or infinite values (stored, or made by converting to the slot's dtype),
        as the loader refuses them in resident weights. Every read is checked, not only an expert's first: a
        single-threaded pass over the slot costs little next to the read itself."""
        layout = self.layouts[layer][expert]
        for index, part in enumerate(layout.views(slot)):
            if part.is_floating_point() and not all_finite(part):
                matrix = "gate/up" if index < len(matrix_parts(layout.templates[0])) else "down"
                files = ", ".join(sorted({p.file.name for p in self.pieces[layer][expert]}))
                raise CheckpointError(
                    f"expert {expert} of MoE layer {layer} ({matrix} weights, in {files}) contains NaN or "
                    "infinite values"
                )

    def drop_files_from_page_cache(self) -> None:
        """Evict every file the experts live in from the OS page cache (before a measured run)."""
        for file in {p.file for layer in self.pieces for expert in layer for p in expert}:
            fd = self._fd(file)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *self._direct_fds.values()]:
                if fd is not None:
                    os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()
