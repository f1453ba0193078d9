"""Retrieval-augmented generation pieces: ingest files, chunk them by tokens, embed, store, retrieve (dense, BM25,
hybrid), and build / check cited prompts.

    ingest.py     text / markdown / HTML files -> Document(source, text)
    chunk.py      token-aware chunks with overlap; character offsets into the source; deterministic keys
    encoder.py    sentence encoder (default all-MiniLM-L6-v2): mean pooling + L2 normalisation
    store.py      VectorStore protocol; SqliteVectorStore (SQLite = source of truth, numpy exact search in memory)
    bm25.py       Okapi BM25 over the same keys
    retrieve.py   dense / BM25 / hybrid (reciprocal-rank fusion) retrieval; incremental indexing of documents
    cite.py       the prompt with numbered sources in a marked data section; citation checking
    xquad_eval.py retrieval recall@k / MRR on XQuAD-en
"""
