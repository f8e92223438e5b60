"""The Polar API versions the simulated Polar serves, and the shapes that differ between them.

Polar answers a request whose `Polar-Version` it does not serve with a bare 404
`{"detail": "Not Found"}`. Seat, subscription, order, member and customer shapes are the same
in 2026-04 and 2026-10; 2027-01 reshapes a seat-based price's tiers (`seat_tiers` becomes
`tiers` with per-unit `bound`/`unit_amount`, and the seat limits become
`minimum_units`/`maximum_units`).
"""

from __future__ import annotations

from typing import Any

API_VERSIONS = ("2026-04", "2026-10", "2027-01")
DEFAULT_API_VERSION = "2026-10"  # what Polar's own SDK calls the current version


def check_api_version(version: str) -> str:
    if version not in API_VERSIONS:
        raise ValueError(f"API version must be one of {', '.join(API_VERSIONS)}")
    return version


def render(data: Any, version: str) -> Any:
    """`data` (state shapes, 2026-10) as `version` serves it; never mutates `data`."""
    if version != "2027-01":
        return data
    return _tiers_2027(data)


def _tiers_2027(value: Any) -> Any:
    if isinstance(value, list):
        return [_tiers_2027(item) for item in value]
    if not isinstance(value, dict):
        return value
    out = {key: _tiers_2027(item) for key, item in value.items()}
    seat_tiers = out.get("seat_tiers")
    if out.get("amount_type") == "seat_based" and isinstance(seat_tiers, dict):
        del out["seat_tiers"]
        out["tiers"] = {
            "type": seat_tiers.get("seat_tier_type") or "volume",
            "tiers": [
                {"bound": tier.get("max_seats"), "unit_amount": str(tier["price_per_seat"])}
                for tier in seat_tiers["tiers"]
            ],
        }
        out["minimum_units"] = seat_tiers.get("minimum_seats")
        out["maximum_units"] = seat_tiers.get("maximum_seats")
    return out
