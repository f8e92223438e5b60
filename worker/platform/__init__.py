"""Infrastructure every stage stands on: database, logs, schema migrations, metric instruments,
Redis, HTTP serving.
"""
