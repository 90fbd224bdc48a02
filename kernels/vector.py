"""Letting the compiler use 16-byte loads and stores on chunks that allow them.

Addresses come from the tensor table, so Triton cannot prove their alignment and, left
alone, moves one element per instruction. Each kernel therefore checks on the device
whether a chunk's addresses are all 16-byte aligned and its start and count are whole
multiples of :data:`VECTOR` elements (:func:`vectorizable`), and runs the same loop in
one of two branches. In the vector branch the pointers and bounds are rebuilt by
rounding them down to those multiples (:func:`aligned_ptr`, :func:`whole_vectors`): a
no-op on values that passed the check, from which the compiler's alignment analysis
derives what it needs for vector accesses.

Why rounding: ``tl.multiple_of`` is an unchecked promise, and it attaches to the
operation that produced a value (nothing at all for a helper's argument), so hinting a
shared value would also make the promise in the scalar branch. The analysis follows
integer arithmetic but not an integer-to-pointer cast, so the rounded address still gets
a hint, on a cast of its own that holds by construction.

The optimizer's own state keeps every slot 16-byte aligned (``fsam_fused.state``), and
parameters and gradients are usually separate allocations, so in practice only the last
chunk of a tensor whose size is not a multiple of 8 takes the scalar branch.
"""

import triton
import triton.language as tl

# Elements per vector-friendly unit: 16 bytes of a 16-bit type, 32 bytes of fp32.
VECTOR: tl.constexpr = tl.constexpr(8)
ALIGNMENT: tl.constexpr = tl.constexpr(16)


@triton.jit
def vectorizable(addresses, start, count):
    """Whether a chunk may take the vector branch.

    ``addresses`` is the bitwise or of every tensor address the chunk touches, so one
    test covers them all (a zero address, a missing momentum, passes and is never read).
    """
    return ((addresses % ALIGNMENT) == 0) & ((start % VECTOR) == 0) & ((count % VECTOR) == 0)


@triton.jit
def aligned_ptr(address, start, ELEMENT: tl.constexpr):
    """Typed pointer to element ``start`` of the tensor at ``address``, for a vectorizable chunk."""
    base = tl.multiple_of((address // ALIGNMENT * ALIGNMENT).to(tl.pointer_type(ELEMENT)), ALIGNMENT)
    return base + start // VECTOR * VECTOR


@triton.jit
def whole_vectors(bound):
    """An element bound of a vectorizable chunk, seen by the compiler as a multiple of :data:`VECTOR`."""
    return bound // VECTOR * VECTOR
