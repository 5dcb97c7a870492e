"""Conformance suite: checks every backend against the CPU reference."""
