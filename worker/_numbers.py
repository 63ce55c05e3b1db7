"""Scalar field types for job specs: numbers that are never booleans, booleans that are
only ``true`` or ``false``.

pydantic's lax mode reads ``true`` as 1 for an ``int`` field and as 1.0 for a ``float`` one,
so ``{"epochs": true}`` would train for one epoch. A spec field typed ``Int`` or ``Float``
refuses booleans and keeps everything else the lax mode allows (``1001.0`` and ``1e3`` are
integers in JSON Schema's sense, and the API's schema says so). The other way round, lax
mode reads ``0``, ``0.0``, ``"off"`` and ``"yes"`` as booleans, which the schema's
``"type": "boolean"`` does not allow: a field typed ``Bool`` takes only ``true`` and
``false``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Strict

__all__ = ["Bool", "Float", "Int", "not_a_boolean"]


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


not_a_boolean = BeforeValidator(_not_a_boolean)
"""For a constrained number inside a union or a list, put the constraints before it:
``Annotated[int, Field(ge=1), not_a_boolean] | None``. Constraints that come after a validator
(``Annotated[Int, Field(ge=1)]``, or ``Int | None = Field(ge=1)``) still apply, but pydantic
writes them into the JSON schema as raw ``ge``/``le`` keys that no client understands."""

Int = Annotated[int, not_a_boolean]
Float = Annotated[float, not_a_boolean]
Bool = Annotated[bool, Strict()]
