"""dd — Distilled Decoding: one-step generation from image autoregressive teachers (DD1, DD2).

A flat package, one module per concept (see the README's module table). Importing `dd` imports nothing heavy;
import the modules you need (`from dd import flow, llamagen`).
"""
__version__ = "0.1.0"
