"""What clients and workers share: Redis key names (keys), the Lua scripts and their arguments (scripts, lua/),
the wire formats (schemas, serializer), enqueueing and recovery, connections, configs, the doorbell. Nothing here
serves a request on its own; both sides import it."""
