"""The HTTP front: LightLLM's protocol over the client SDK (front), uvicorn plumbing (serving), the protocol's
bodies and answers (lightllm), answer segments in shared memory, and the front's metrics."""
