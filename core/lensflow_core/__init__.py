"""lensflow_core: the ground every other part of lensflow stands on.

Settings, S3/MinIO clients, Kafka client settings, untrusted-image decoding and the one
LiteRT runtime. It imports nothing first-party, so the functions, the model store and the
eventing package can use it without carrying the operator's tool (``lensflow``).
"""
