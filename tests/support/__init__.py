"""Test-side stand-ins for Polar itself, written from Polar's documented behaviour."""
