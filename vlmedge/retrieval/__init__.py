"""Retrieval with dual-encoder bundles (CLIP, SigLIP): image embeddings in a Milvus collection, searched by
text or by image (`vlmedge index`, `vlmedge search`). pymilvus is imported only here, and only when used."""
