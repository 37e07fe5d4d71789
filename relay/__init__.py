"""The media relay (SFU). Signaling and the recorder reach it only through ``relay.api``."""
