"""The HTTP front: LightLLM's protocol over the client SDK (front: the server and its routes; generate: POST
/generate; readiness: whether a live worker serves the queue; config), uvicorn plumbing (serving), the protocol's
bodies and answers (lightllm), answer segments in shared memory, and the front's metrics."""
