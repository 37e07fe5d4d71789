"""Codec and RTP facts written once: what the relay, the recorder and the benchmarks read from
encoded media without decoding it (``codec.rtp``)."""
