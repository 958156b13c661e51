"""Adapters: the Postgres inventory store and the policy file source."""
