"""Polar's API as we use it: the client, its errors (classified once), response schemas, the shared
rate budget, the one retry policy.
"""
