"""What clients and workers share: Redis key names (keys), the Lua scripts and each one's arguments (scripts,
lua/), the wire formats (schemas, serializer), RQ's job records (enqueue), connections, configs, the doorbell, queue
names (queues) and which host a process is on (host). Nothing here serves a request on its own; both sides import
it."""
