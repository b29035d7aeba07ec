"""`python -m broker.http_front`: the name LightX2V deployments start the front by (broker.http is its home)."""

from broker.http.front import main

if __name__ == "__main__":
    raise SystemExit(main(prog="python -m broker.http_front"))
