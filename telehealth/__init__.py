"""Telehealth Bridge: the start-up package that wires the relay, the recorder and signaling."""
