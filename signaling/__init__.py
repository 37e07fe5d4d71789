"""Signaling: sign-in, the consult queue, pairing, consultations, presence and the SDP/ICE
exchange with relays. It never imports aiortc; relays are reached through ``relay.api``."""
