"""Throughput and latency of the real worker against its ceilings, measured in one run (issue 6).

    python -m benchmarks.throughput           # make bench: the full run, about 20 minutes on 2 cores
    python -m benchmarks.throughput --quick   # make bench-quick: a smoke run under a minute (CI)

Everything talks to a redis-server this script starts on a free port (never anyone's data) and
kills at the end. The steps:

1. an artifact: `anomaly-trainer train` (dense-64-16, 2 epochs on 5000 digits), cached under
   benchmarks/.cache/, or --artifact; it has dense_stack.npz, so workers use the numpy engine;
2. pre-filled input streams of MNIST test digits, one per payload dtype (uint8, float32, json);
3. ceilings: a bare consumer loop (XREADGROUP + decode to a float32 array + XACK, no scoring) and
   the forward pass alone (score_batch of the numpy engine and of the XLA-compiled TensorFlow
   engine), with the eager model call, model.predict and one model.predict per message for
   reference;
4. the real worker (`python -m worker`, as deployed) draining the same entries: it is started once
   per configuration and waits on an idle group; the benchmark rewinds the group (XGROUP SETID),
   adds one entry to wake the blocked read and polls XINFO GROUPS until every entry is delivered and
   acknowledged. Each drain is paired with a bare-loop pass over the same entries just before it,
   so the ratio compares two numbers taken under the same machine load;
5. paced runs: a producer at half the worker's maximum rate, and at 5,000 msg/s, with the worker
   as deployed (no scores stream); the producer writes pre-encoded XADDs on a raw socket, so it
   takes little of the cores the worker and Redis share with it. Latency of each flagged message
   (a few percent of MNIST digits are flagged, a sample of every batch) is (id of its output
   entry, stamped by Redis at commit) - (id of its input entry, stamped by Redis at XADD), both in
   Redis' milliseconds; the worker's own anomaly_end_to_end_latency_seconds histogram covers every
   message;
6. two workers on one group; the TensorFlow engine on the same drain for reference; start-to-ready
   time; resident memory, and in the full run its trend over a 10-minute paced run.

Results: one table on stdout, and benchmarks/results/{throughput.json, throughput.md, throughput.png}.

Layout: plan (what a run does, names), helpers (ports, deadlines, /proc, Prometheus text),
project (the one module importing worker code), processes (redis-server, raw producer, worker),
session (the Bench: streams and workers), one module per measurement: ceilings (step 3), drains
(step 4), paced (step 5), variants (step 6); run (the steps in order), results (table, targets,
files, plot), cli (`main`).
"""
