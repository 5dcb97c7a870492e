"""Tests of the conformance suite (crossinfer_conformance)."""
