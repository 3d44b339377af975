"""Functional ops."""
