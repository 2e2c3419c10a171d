"""OpenAI-compatible HTTP serving of several llmopt models at once, with hot-swapping.

    llmopt serve --results results/ --backend cpu --max-loaded 2 --port 8000
    curl localhost:8000/v1/chat/completions -d '{"model": "gemma-3-270m/w4g128", "messages": [...]}'

``pool`` keeps loaded models (least recently used first out, at most ``max_loaded``) and reloads a model when its
folder's weights change on disk (a new quantization lands); ``app`` is the FastAPI application.
"""

from llmopt.serve.app import create_app
from llmopt.serve.pool import ModelPool, discover_models

__all__ = ["ModelPool", "create_app", "discover_models"]
