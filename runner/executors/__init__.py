"""Executors: several ways to run the same bundle graphs behind one interface (see base.py)."""
