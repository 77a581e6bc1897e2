#!/usr/bin/env bash
# Runs the ops kit checks by hand (the same ones tests/ops_kit.rs runs, minus the
# metric-name lint, which needs the Rust catalogue):
#   deploy/check.sh
# Needs promtool and amtool: apt-get install -y prometheus prometheus-alertmanager
set -euo pipefail

cd "$(dirname "$0")/.."

for tool in promtool amtool; do
    if ! command -v "$tool" >/dev/null; then
        echo "check.sh: $tool not found (apt-get install -y prometheus prometheus-alertmanager)" >&2
        exit 1
    fi
done

if command -v python3 >/dev/null; then
    echo "== generated rules and dashboards are up to date"
    python3 deploy/generate.py --check
fi

echo "== promtool check rules"
promtool check rules deploy/prometheus/*.rules.yml

echo "== promtool check rules (sakuga report's queries)"
promtool check rules deploy/prometheus/report-queries.json

echo "== promtool test rules"
promtool test rules deploy/prometheus/tests/*.test.yml

echo "== amtool check-config"
amtool check-config deploy/alertmanager/alertmanager.yml

echo "== amtool config routes test"
failures=0
while read -r receiver labels; do
    case "$receiver" in ''|'#'*) continue ;; esac
    # shellcheck disable=SC2086 # labels are separate words on purpose
    if amtool config routes test --config.file=deploy/alertmanager/alertmanager.yml \
        --verify.receivers="$receiver" $labels >/dev/null 2>&1; then
        echo "  ok   $labels -> $receiver"
    else
        echo "  FAIL $labels -> expected $receiver"
        failures=$((failures + 1))
    fi
done < deploy/alertmanager/route-tests.txt

echo "== every alert has a runbook"
for alert in $(grep -ho 'alert: [A-Za-z]*' deploy/prometheus/*.rules.yml | cut -d' ' -f2 | sort -u); do
    if [ ! -f "docs/runbooks/$alert.md" ]; then
        echo "  missing docs/runbooks/$alert.md"
        failures=$((failures + 1))
    fi
done

if [ "$failures" -gt 0 ]; then
    echo "check.sh: $failures failure(s)" >&2
    exit 1
fi
echo "check.sh: all checks passed"
