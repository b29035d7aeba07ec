"""Every failure a client meets is a BrokerError that says what to do, and the HTTP front answers each in JSON with
a status that says whose fault it is: Redis refusing commands (out of memory, a read-only replica, a
missing permission, a key of another type) is RedisRefused and 503; a prompt that is not valid Unicode is
InvalidRequest before anything is sent, and 422. Real redis-servers, set up to fail as they do in the field."""

import asyncio
import uuid

import pytest
import redis

from broker.client import EncoderClient
from broker.errors import BrokerError, BrokerUnavailable, InvalidRequest, RedisRefused
from broker.generation import GenerationClient
from broker.protocol.schemas import EncodeRequest, GenerateRequest
from broker.redis_errors import broker_error
from tests.helpers import RedisServer
from tests.test_http_front import FrontThread, call, lightx2v_payload, stalled_worker

SURROGATE = "a fox \ud800 in snow"  # a lone surrogate: what a JSON escape or a bad decode can make


@pytest.fixture(scope="module")
def full_redis():
    """A Redis at its maxmemory, evicting nothing (as a Redis whose results expire too slowly ends up)."""
    server = RedisServer().start()
    r = redis.Redis(port=server.port)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", "1mb")
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for i in range(1000):
            r.set(f"filler:{i}", b"x" * 10_000)
    yield server
    server.cleanup()


def queue_name() -> str:
    return "errors-" + uuid.uuid4().hex[:8]


def encode_with(client: EncoderClient, api: str, prompts: list[str]):
    if api == "aencode":
        async def run():
            try:
                return await client.aencode(prompts)
            finally:
                await client.aclose()
        return asyncio.run(run())
    return client.encode(prompts)


@pytest.mark.parametrize("api", ["encode", "aencode"])
def test_a_full_redis_is_redis_refused_saying_what_to_do(full_redis, api):
    with EncoderClient(full_redis.url, queue=queue_name(), timeout=5) as client:
        with pytest.raises(RedisRefused, match="out of memory") as caught:
            encode_with(client, api, ["a fox"])
    assert isinstance(caught.value, BrokerError)
    assert "raise maxmemory" in str(caught.value) and "result_ttl_s" in str(caught.value)


def test_a_generation_client_meets_the_same_error(full_redis):
    client = GenerationClient(full_redis.url, queue=queue_name(), timeout=5)
    try:
        with pytest.raises(RedisRefused, match="raise maxmemory"):
            client.submit("a lighthouse")
    finally:
        client.close()


def test_the_front_answers_a_full_redis_with_503_in_json(full_redis):
    queue, r = queue_name(), redis.Redis.from_url(full_redis.url)
    r.config_set("maxmemory", "0")  # room for a worker's registration, then full again
    with stalled_worker(full_redis.url, queue), FrontThread(redis_url=full_redis.url, queue=queue, timeout=5.0) as f:
        r.config_set("maxmemory", "1mb")
        status, body, headers = call(f.port, "POST", "/generate", lightx2v_payload("a fox"))
    assert (status, headers["content-type"]) == (503, "application/json"), (status, body)
    assert body["code"] == 503 and "out of memory" in body["message"] and "raise maxmemory" in body["message"]


def test_a_read_only_replica_is_redis_refused():
    primary, replica = RedisServer().start(), RedisServer().start()
    try:
        redis.Redis(port=replica.port).replicaof("127.0.0.1", primary.port)
        with EncoderClient(replica.url, queue=queue_name(), timeout=5) as client:
            with pytest.raises(RedisRefused, match="read-only replica: point redis_url at the primary"):
                client.encode(["a fox"])
    finally:
        replica.cleanup()
        primary.cleanup()


def test_a_user_without_permission_is_redis_refused(redis_server):
    user = "eb-limited-" + uuid.uuid4().hex[:6]
    admin = redis.Redis.from_url(redis_server.url)
    admin.acl_setuser(user, enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
                      commands=["+@all", "-evalsha", "-eval"])
    try:
        url = redis_server.url.replace("redis://", f"redis://{user}:secret@")
        with EncoderClient(url, queue=queue_name(), timeout=5) as client:
            with pytest.raises(RedisRefused, match="may not run a command") as caught:
                client.encode(["a fox"])
        assert "secret" not in str(caught.value)  # the URL is shown redacted
    finally:
        admin.acl_deluser(user)


def test_a_key_of_another_type_is_redis_refused(redis_server):
    queue = queue_name()
    r = redis.Redis.from_url(redis_server.url)
    r.set(f"rq:queue:{queue}", "another program's value")
    try:
        with EncoderClient(redis_server.url, queue=queue, timeout=5) as client:
            with pytest.raises(RedisRefused, match="another kind of value.*a database of its own"):
                client.encode(["a fox"])
    finally:
        r.delete(f"rq:queue:{queue}")


@pytest.mark.parametrize("err, kind, says", [
    (redis.exceptions.NoScriptError("No matching script."), RedisRefused, "does not have the broker's Lua script"),
    (redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable "
                                    "to persist to disk."), RedisRefused, "cannot write its data to disk"),
    (redis.exceptions.ResponseError("BUSY Redis is busy running a script."), RedisRefused, "SCRIPT KILL"),
    (redis.exceptions.AuthenticationWrongNumberOfArgsError("wrong number of arguments for 'auth' command"),
     RedisRefused, "a username in the URL needs Redis 6"),
    (redis.exceptions.ResponseError("ERR something new"), RedisRefused, "see its log"),
    (redis.exceptions.DataError("Invalid input of type: 'dict'"), RedisRefused, "see its log"),
    (redis.exceptions.InvalidResponse("Protocol Error: H, TTP/1.1"), BrokerUnavailable, "cannot reach Redis"),
    (redis.exceptions.AuthenticationError("invalid password"), BrokerUnavailable, "asks for a password"),
])
def test_every_redis_error_is_a_broker_error_with_what_to_do(err, kind, says):
    """The ones a test Redis is not easily made to answer: each maps to a BrokerError and its advice."""
    got = broker_error("redis://:hunter2@127.0.0.1:6390/0", err)
    assert type(got) is kind and says in str(got), got
    assert "hunter2" not in str(got)


# -- a prompt that is not valid Unicode ----------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: EncodeRequest(prompts=["fine", SURROGATE]),
    lambda: GenerateRequest(prompt=SURROGATE),
    lambda: GenerateRequest(prompt="fine", negative_prompt=SURROGATE),
    lambda: GenerateRequest(prompt="fine", output_dir="/tmp/\udcff"),
])
def test_a_lone_surrogate_is_an_invalid_request(build):
    with pytest.raises(InvalidRequest, match="is not valid Unicode text: .* is a lone surrogate"):
        build().validate()


@pytest.mark.parametrize("api", ["encode", "aencode"])
def test_a_client_refuses_a_lone_surrogate_before_sending(redis_server, api):
    queue = queue_name()
    with EncoderClient(redis_server.url, queue=queue, timeout=5) as client:
        with pytest.raises(InvalidRequest, match="prompt 0 is not valid Unicode text"):
            encode_with(client, api, [SURROGATE])
    assert redis.Redis.from_url(redis_server.url).llen(f"rq:queue:{queue}") == 0  # nothing was sent


def test_the_front_answers_a_lone_surrogate_with_422(redis_server):
    queue = queue_name()
    with stalled_worker(redis_server.url, queue), FrontThread(redis_url=redis_server.url, queue=queue, timeout=5.0) as f:
        status, body, _ = call(f.port, "POST", "/generate", lightx2v_payload(SURROGATE))  # JSON: "\ud800"
        assert status == 422 and body["code"] == 422 and "not valid Unicode text" in body["message"], body
        assert call(f.port, "GET", "/liveness")[0] in (200, 503)  # and it goes on serving
