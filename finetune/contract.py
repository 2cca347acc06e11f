"""The data contract of an encoder artifact against the data it is evaluated or finetuned on.

:func:`check_data_contract` compares the point count and normalisation of the data a user points at with the
preprocessing recorded in the artifact (``data_contract`` of ``encoder.json``), so an encoder is never
silently fed data prepared differently from what it was trained on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datapipes.errors import UserError

__all__ = ["check_data_contract"]


def check_data_contract(
    meta: Mapping[str, Any],
    num_points: int,
    normalization: str | None,
    *,
    allow_num_points_change: bool = False,
    override_hint: str = "pass --num-points {n} to evaluate on purpose",
) -> list[str]:
    """Checks that the data matches the preprocessing recorded in an encoder artifact.

    Args:
        meta: artifact metadata from ``pretrain.checkpoint.load_encoder`` (uses ``meta["data_contract"]``).
        num_points: points per cloud that will be fed to the encoder.
        normalization: normalization of the data (``"unit_sphere"`` or ``"none"``), or None when unknown
            (then only a warning is returned).
        allow_num_points_change: the user asked for a point count on purpose; a difference from the
            contract is returned as a warning instead of an error.
        override_hint: how to ask for another point count on purpose (``{n}``: the data's count), appended
            to the error.

    Returns:
        Warnings (strings) for the caller to show; empty when everything matches.

    Raises:
        UserError: the point count or the normalization differs from the contract, or the artifact has no
            readable data contract.
    """
    contract = meta.get("data_contract")
    if not isinstance(contract, Mapping):
        raise UserError("the encoder artifact has no data_contract; re-export it with pcpt-pretrain export")
    warnings: list[str] = []
    expected_points = contract.get("num_points")
    if expected_points is not None and int(expected_points) != int(num_points):
        message = (
            f"data contract mismatch: the encoder was trained on {int(expected_points)} points per cloud, "
            f"got {int(num_points)}"
        )
        if not allow_num_points_change:
            raise UserError(f"{message}; {override_hint.format(n=int(num_points))}")
        warnings.append(message)
    expected_norm = contract.get("normalization")
    if expected_norm is not None:
        if normalization is None:
            warnings.append(
                f"the data does not record its normalization; the encoder expects {expected_norm!r}"
            )
        elif str(normalization) != str(expected_norm):
            raise UserError(
                f"data contract mismatch: the encoder expects normalization {expected_norm!r}, "
                f"the data has {normalization!r}"
            )
    return warnings
