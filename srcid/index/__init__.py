"""FAISS indexes over retrieval embeddings, their persistence, and the catalog they derive from."""
