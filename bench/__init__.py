"""Load harness for pqmsg-server: ``python -m bench --help``.

Modules, one job each:

- :mod:`bench.options`: the command line, as one frozen ``Options``;
- :mod:`bench.population`: accounts, devices and prekeys made through the SDK;
- :mod:`bench.signer`: pre-signed requests from a pool of signer processes;
- :mod:`bench.load`: closed-loop and open-loop (fixed arrival rate) drivers;
- :mod:`bench.scenario`: what one operation of each scenario does;
- :mod:`bench.streams`: recipients on WebSocket streams (``--receive stream``);
- :mod:`bench.stats`: latency samples, percentiles and the timeline;
- :mod:`bench.cpu`: the harness's and the server's CPU, loop lag, warnings;
- :mod:`bench.report`: the table, the JSON and the PNG plot;
- :mod:`bench.spawn`: start the server or the baseline app as a subprocess;
- :mod:`bench.baseline_app`: the bare Quart-Trio floor (``python -m bench.baseline_app``);
- :mod:`bench.prefill`: queue many messages straight into SQLite or PostgreSQL;
- :mod:`bench.idle_polls`: server memory while it holds thousands of idle long polls;
- :mod:`bench.idle_streams`: the same with idle WebSocket streams;
- :mod:`bench.h2client`, :mod:`bench.transport`, :mod:`bench.hpack_raw`: how requests
  go out (a lean HTTP/2 client, or httpx; header values as raw literals);
- :mod:`bench.quiet`, :mod:`bench.medians`, :mod:`bench.profile_summary`: campaign
  helpers (wait for a quiet machine, medians over runs, py-spy profile summary);
- ``bench/campaign.sh``, ``bench/ab_patched.sh``, ``bench/patched_serve.py``,
  ``bench/trace_serve.py``: the runs
  behind ``bench/RESULTS.md``.

``bench/pg_bridge.py`` is a separate script (asyncpg bridges compared).
"""
