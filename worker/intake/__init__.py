"""Webhook intake: verify the signature, record the delivery durably, route it to scopes, request
syncs.
"""
