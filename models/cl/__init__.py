"""Continual-learning methods as plugins behind one hook interface (see base.py)."""
