"""`python -m broker.http_front`, the front's command before it moved to broker.http: LightX2V deployments start it
by this name, so it keeps working."""

from broker.http.front import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m broker.http_front"))
