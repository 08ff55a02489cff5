#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for FUZZ_SECONDS (default 30) from
# its committed seeds, one after another, and prints one summary line per
# target. Exits non-zero if any target crashes (or fails to build).
#
#   scripts/fuzz-smoke.sh                         # CI smoke: 30 s each
#   FUZZ_SECONDS=600 scripts/fuzz-smoke.sh        # `make fuzz`
#   FUZZ_TARGETS="ws_frames http_chunked" scripts/fuzz-smoke.sh
#
# Only the stable toolchain is assumed: RUSTC_BOOTSTRAP=1 lets cargo-fuzz
# pass its nightly-only flags (-Zsanitizer=address, sancov). Seeds are read
# from fuzz/seeds/<target>/ (committed); what the fuzzer finds goes to the
# scratch corpus fuzz/corpus/<target>/ and crashes to fuzz/artifacts/<target>/
# (both ignored by git); logs to fuzz/logs/<target>.log. See fuzz/README.md.
set -euo pipefail

cd "$(dirname "$0")/.."
SECONDS_EACH="${FUZZ_SECONDS:-30}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-smoke: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

TARGETS="${FUZZ_TARGETS:-$(cargo fuzz list)}"
echo "fuzz-smoke: building targets" >&2
cargo fuzz build >&2
mkdir -p fuzz/logs

failed=0
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t"
    log="fuzz/logs/$t.log"
    # First corpus dir is written to, the seeds dir only read.
    if cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
    corpus=$(grep -o 'corp: [0-9]*/[0-9]*[a-zA-Z]*' "$log" | tail -n 1 | cut -d' ' -f2)
    printf '%-20s %-5s secs=%-5s execs=%-11s corpus=%s\n' \
        "$t" "$status" "${secs:-?}" "${execs:-?}" "${corpus:-?}"
    if [ "$status" != ok ]; then
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written to' "$log" | head -n 8 >&2 || true
        echo "fuzz-smoke: full log in $log" >&2
    fi
done
exit "$failed"
