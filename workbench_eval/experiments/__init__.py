"""Tiny-scale reproductions of the BOSE paper's claims (stability, consistency)."""
