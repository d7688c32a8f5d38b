"""Enqueue LLaVA-NeXT jobs and report on them (no models, no database)."""
