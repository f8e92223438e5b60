"""What runs on the queue: arq jobs, cron, the worker's settings, and invitation
reminders/renewals.
"""
