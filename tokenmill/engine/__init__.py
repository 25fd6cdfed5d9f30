"""The one request path: requests (request.py) queued by LLMEngine (llm_engine.py), scheduled in token counts over KV
blocks (scheduler.py, block_manager.py), run by the model runner (model_runner.py) over the paged KV cache (kv_cache.py,
cuda_graphs.py), and post-processed per sequence (sequence.py, stops.py)."""
