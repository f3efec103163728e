"""Triton kernels with torch reference implementations behind one dispatch point."""
