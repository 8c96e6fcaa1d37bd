"""Scheduled (cron and interval) tasks for qtasks, without a separate beat service."""
