#!/usr/bin/env bash
# Re-runs the probes of issue 17's findings (tests/tests/hardening_probes.rs) against debug
# `latentserve-worker serve` processes on the demo model, on 127.0.0.1 only, and prints one row
# per probe: fixed or NOT FIXED. Exits non-zero if any finding is not fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p latentserve-worker --bins --locked
cargo test -p latentserve-e2e --test hardening_probes --locked -- --nocapture 2>&1 \
  | grep -E '^\||^test result|panicked|findings not fixed'
