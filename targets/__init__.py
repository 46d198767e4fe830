"""Targets: backends that read a plan or a manifest and never change it."""
