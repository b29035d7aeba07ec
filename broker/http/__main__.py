"""python -m broker.http: the LightLLM-protocol HTTP front (broker.http.front)."""

from broker.http.front import main

if __name__ == "__main__":
    raise SystemExit(main())
