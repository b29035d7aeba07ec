"""Names shared by clients and workers."""

DEFAULT_QUEUE = "encode"
# Jobs name this function; a worker runs nothing else. It is a name, not an import path: workers never
# import a function from job data.
ENCODE_FUNCTION = "encoder_broker.encode"
DEFAULT_GENERATE_QUEUE = "generate"
GENERATE_FUNCTION = "encoder_broker.generate"
