"""The encoder worker's stages, one thread each (workers.worker wires them): intake -> compute -> delivery, with
links.py naming all they share and types.py what they hand each other."""
