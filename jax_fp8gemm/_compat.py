"""The only place that reaches past JAX's documented API.

Everything else in the package uses jax.extend, jax.interpreters.{mlir,batching} and
jax.ffi. If a JAX release moves one of these, this file is the one to change.
"""

try:  # eager evaluation of a primitive by compiling it alone
    from jax.interpreters.xla import apply_primitive
except ImportError:  # pragma: no cover - newer JAX
    from jax._src.dispatch import apply_primitive

from jax.core import ShapedArray

# The batch dimension of an operand vmap does not map over (JAX uses None internally).
try:
    from jax.interpreters.batching import not_mapped
except ImportError:
    not_mapped = None

__all__ = ["apply_primitive", "ShapedArray", "not_mapped"]
