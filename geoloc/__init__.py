"""geoloc: where was this street-level photo taken?

Divide&Classify cell prediction on timm descriptors, then FAISS retrieval restricted to the
predicted cells, in one engine answering in three modes: classify, retrieve, hybrid.
"""

__version__ = "0.1.0"
