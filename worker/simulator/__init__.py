"""Simulated Polar.sh API and signed webhooks for tests, the demo and benchmarks."""
