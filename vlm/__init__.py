"""The model layer: VLM loading and vision path, embedder, preprocessing, tiny models, batch encoder.

Both sides use it: `streamer` (writing memory: the vision path and the batch encoder) and
`retrieval` (asking memory: text embedding and generation). It imports only `memory`.
"""
