"""Serve models over an OpenAI-compatible HTTP API (several at once; hot-swapped when their weights change).

Examples:
  llmopt serve --results results                       # every source and quantized model the workflow built
  llmopt serve --model g270m=results/gemma-3-270m/w4g128/quant --backend vulkan --port 8001
Then: curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
        -d '{"model": "g270m", "messages": [{"role": "user", "content": "Hello"}], "stream": true}'
"""

from __future__ import annotations

from pathlib import Path

from llmopt.errors import LlmoptError

NAME = "serve"
HELP = "serve models over an OpenAI-compatible HTTP API"


def add_arguments(p) -> None:
    p.add_argument("--results", type=Path, help="serve every model folder of this workflow results tree "
                   "(names: MODEL for results/MODEL/source, MODEL/SCHEME for results/MODEL/SCHEME/quant)")
    p.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER",
                   help="serve this model folder under NAME (repeatable; adds to --results)")
    p.add_argument("--backend", default="cpu", help="backend that runs the models: cpu, vulkan, cuda, iree-cpu, npu "
                   "(default: cpu)")
    p.add_argument("--max-loaded", type=int, default=2,
                   help="models kept in memory at once; the least recently used is evicted (default: 2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")


def run(args) -> int:
    import uvicorn

    from llmopt.serve import ModelPool, create_app, discover_models

    folders = discover_models(args.results) if args.results else {}
    for item in args.model:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise LlmoptError(f"--model {item!r}: expected NAME=FOLDER")
        folders[name] = Path(folder)
    if not folders:
        raise LlmoptError("nothing to serve: give --results DIR (a workflow results tree) or --model NAME=FOLDER")
    pool = ModelPool(folders, backend=args.backend, max_loaded=args.max_loaded)
    print(f"llmopt: serving {', '.join(pool.names())} on http://{args.host}:{args.port}/v1 ({args.backend})")
    uvicorn.run(create_app(pool), host=args.host, port=args.port, log_level="info")
    return 0
