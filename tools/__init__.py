"""Standalone utilities: tiny model builder, toy task, API judge clients, model merger, benchmarks."""
