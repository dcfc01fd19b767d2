"""Optional peers for the throughput benchmark: vLLM's CPU backend and llama.cpp.

Each runs outside genq's virtualenv (a venv of its own, a binary built once) and is skipped,
with its reason, when it is not installed. ``benchmarks/peers/install_peers.sh`` installs both.
"""
