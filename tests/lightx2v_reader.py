"""A stand-in for LightX2V's lightllm_service text encoder, reading answers exactly as it does (ModelTC/LightX2V,
lightx2v/models/input_encoders/lightllm/qwen25_text_encoder_service.py `infer` and shm_client.py
`read_hidden_states`), run as its own process so that multiprocessing's resource tracker behaves as it does there.

    python tests/lightx2v_reader.py URL USE_SHM DROP_IDX OUT PROMPT...

POSTs each (already templated) PROMPT to URL/generate, views the answer's uint8 bytes as bfloat16 whatever else it
says, adds the batch dimension, drops the template's DROP_IDX tokens, and saves the list of [1, L, D] tensors to
OUT (torch.save), with what it saw of each segment. Like LightX2V's reader it opens a segment with
multiprocessing.shared_memory.SharedMemory(name=...), copies it, closes it, and never unlinks it.
"""

import base64
import json
import os
import sys
import urllib.request
from multiprocessing import shared_memory

import numpy as np
import torch


def call_service(url: str, text: str) -> dict:
    payload = {"inputs": text, "parameters": {"do_sample": False, "return_details": True, "max_new_tokens": 1}}
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:  # raise_for_status: urllib raises on 4xx/5xx
        return json.loads(r.read())


def read_hidden_states(shm_name: str, shape) -> np.ndarray:
    shm = shared_memory.SharedMemory(name=shm_name)
    arr = np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)
    result = arr.copy()
    shm.close()  # no unlink: the server owns the segment's lifetime
    return result


def infer(url: str, use_shm: bool, drop_idx: int, text: str) -> tuple[torch.Tensor, dict]:
    result = call_service(url, text)
    seen = {"keys": sorted(result)}
    if use_shm and "shm_hidden_states_name" in result:
        name = result["shm_hidden_states_name"]
        hidden_states = torch.from_numpy(read_hidden_states(name, tuple(result["shm_hidden_states_shape"])))
        seen.update(via="shm", name=name, exists_after_close=os.path.exists(f"/dev/shm/{name}"))
    elif "hidden_states_base64" in result:
        data_bytes = base64.b64decode(result["hidden_states_base64"])
        hidden_states = torch.from_numpy(np.frombuffer(data_bytes, dtype=np.uint8).reshape(
            result["hidden_states_shape"]))
        seen.update(via="base64")
    else:
        raise ValueError(f"response missing 'hidden_states_base64'. Response keys: {result.keys()}")
    hidden_states = hidden_states.view(torch.bfloat16)
    if len(hidden_states.shape) == 2:
        hidden_states = hidden_states.unsqueeze(0)
    if drop_idx > 0 and hidden_states.shape[1] > drop_idx:
        hidden_states = hidden_states[:, drop_idx:, :]
    return hidden_states, seen


def main() -> None:
    url, use_shm, drop_idx, out, *prompts = sys.argv[1:]
    results = [infer(url, use_shm == "1", int(drop_idx), p) for p in prompts]
    torch.save({"states": [r[0].clone() for r in results], "seen": [r[1] for r in results]}, out)


if __name__ == "__main__":
    main()
